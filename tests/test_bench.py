"""`zerotune bench --tiny`: the harness (not the speed). Both sides must train the same model on the same data."""

from __future__ import annotations

import json

import pytest

from zerotune.bench import ARCHITECTURES, lora_mfu, matmul_weights, run_bench, spread, summary
from zerotune.cli import main
from zerotune.bench.power import PowerSampler, summarise

REQUIRED = {"workload", "gpu", "commit", "command", "ours", "baseline", "ratio"}


@pytest.mark.parametrize("workload", ["w1", pytest.param("w4", marks=pytest.mark.slow)])  # w4: two processes
def test_bench_writes_a_result_where_both_sides_start_from_the_same_loss(workload, tmp_path):
    result = run_bench(workload, tiny=True, steps=3, warmup=1, out_dir=str(tmp_path / "results"),
                       work_dir=str(tmp_path / "work"))
    written = json.loads((tmp_path / "results" / f"{result['date']}-cpu{'x2' if workload == 'w4' else ''}-"
                                                 f"{workload}-tiny.json").read_text())
    assert REQUIRED <= written.keys()
    for side in ("ours", "baseline"):
        assert written[side]["tokens_per_second"] > 0 and "peak_gib" in written[side]
        assert len(written[side]["losses"]) == 3 and written[side]["timed_steps"] == 2
        # the timed steps' own times, and the median step's speed lies within what they span
        seconds = written[side]["step_seconds"]
        assert len(seconds) == 2 and all(t > 0 for t in seconds)
        median = written[side]["median_step_tokens_per_second"]
        slack = 1 + 1e-5 / min(seconds)  # the stored times are rounded to 10 microseconds (tiny steps take ~9 ms)
        assert written[side]["tokens_per_second"] * min(seconds) / max(seconds) <= median * slack
        assert median <= written[side]["tokens_per_second"] * max(seconds) / min(seconds) * slack
        assert 1 <= written[side]["step_spread"] <= max(seconds) / min(seconds) * slack
    assert written["median_step_ratio"] == pytest.approx(written["ours"]["median_step_tokens_per_second"]
                                                         / written["baseline"]["median_step_tokens_per_second"])
    assert written["ratio"] == pytest.approx(written["ours"]["tokens_per_second"]
                                             / written["baseline"]["tokens_per_second"])
    # same random weights and the same first batch (LoRA B starts at zero): the same step-1 loss
    assert written["ours"]["losses"][0] == pytest.approx(written["baseline"]["losses"][0], rel=1e-5)
    assert written["gpus"] == (2 if workload == "w4" else 1)
    # no NVML on a CPU machine: no power readings, and the sides' wall-clock windows are not kept
    assert not {"power", "timed_window"} & (written["ours"].keys() | written["baseline"].keys())


def test_bench_w3_compares_packed_rows_with_padded_batches(tmp_path, capsys):
    status = main(["bench", "w3", "--tiny", "--steps", "3", "--warmup-steps", "1", "--out-dir", str(tmp_path),
                   "--work-dir", str(tmp_path / "work"), "model.chunked_loss=false"])
    assert status == 0
    (path,) = tmp_path.glob("*-cpu-w3-tiny.json")
    result = json.loads(path.read_text())
    assert result["metric"].startswith("effective")
    assert result["ours"]["real_token_fraction"] > 0.9 > result["baseline"]["real_token_fraction"]
    assert result["settings"]["ours"]["chunked_loss"] is False and result["settings"]["ours"]["packing"] is True
    assert result["settings"]["ours"]["cuda_graph"] == "auto"  # on CPU auto leaves graphs off
    assert "ratio" in capsys.readouterr().out


def test_lora_mfu_follows_anchors_accounting():
    assert matmul_weights(ARCHITECTURES["llama-2-7b"]) == pytest.approx(6.607e9, rel=1e-3)
    # ANCHORS.md: HF+PEFT mb1 at 7,693 tokens/s is 21.8% LoRA-MFU on an H100
    assert lora_mfu(7693, ARCHITECTURES["llama-2-7b"], 2048, "NVIDIA H100 80GB HBM3") == pytest.approx(0.218, abs=1e-3)
    assert lora_mfu(7693, ARCHITECTURES["llama-2-7b"], 2048, "some other accelerator") is None


def test_bench_refuses_unknown_workloads_and_gpu_workloads_on_cpu(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "w9"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["bench", "w1", "--out-dir", "/nonexistent"]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_summary_flags_a_baseline_whose_steps_wandered():
    """A baseline slowed by a noisy machine flatters the ratio: the printed summary says so past 1.05x between
    its 90th- and 10th-percentile step times (not for W3, whose steps differ by their lengths)."""
    def result(spread, metric="tokens/s"):
        side = {"tokens_per_second": 1000.0, "peak_gib": 1.0, "step_spread": spread}
        return {"workload": "w2", "gpu": "H200", "metric": metric, "ratio": 2.0, "median_step_ratio": 2.0,
                "baseline": side, "ours": dict(side, step_spread=1.3)}

    assert "note:" not in summary(result(1.04))
    assert "HF+PEFT's steps wandered (90th-percentile step 1.30x the 10th" in summary(result(1.3))
    assert "note:" not in summary(result(1.3, metric="effective (non-pad) tokens/s"))


def test_spread_ignores_one_slow_step_and_sees_a_wandering_stretch():
    steady = [0.240] * 19 + [0.256]
    wandering = [0.240] * 10 + [0.300] * 10
    assert spread(steady) == pytest.approx(1.0) and spread(wandering) == pytest.approx(1.25)
    assert spread([0.1]) == 1.0 and spread([0.1, 0.2]) == pytest.approx(0.19 / 0.11)  # deciles interpolated


def test_power_window_reads_watts_from_the_energy_counter_inside_the_window():
    """Mean watts come from the energy counter's rise over the window (not the instantaneous readings), the clock
    is the window's median, and joules per step are the mean watts times the mean step time."""
    sampler = PowerSampler.__new__(PowerSampler)
    sampler.limit_watts = 700.0
    # 2 s at 300 W (an idle stretch), then 1 s at 690 W; samples every 0.1 s: (time, mJ, instant W, SM MHz)
    sampler.samples = [(t / 10, 300e3 * t / 10, 250.0, 1980.0) for t in range(21)]
    sampler.samples += [(2 + t / 10, 600e3 + 690e3 * t / 10, 999.0, 1500.0 + t) for t in range(1, 11)]
    busy = sampler.window(2.05, 3.0, seconds_per_step=0.12)
    assert busy["mean_watts"] == pytest.approx(690.0) and busy["joules_per_step"] == pytest.approx(82.8)
    assert busy["sm_mhz_median"] == pytest.approx(1505.5) and busy["sm_mhz_range"] == [1501.0, 1510.0]
    assert busy["power_limit_watts"] == 700.0
    assert sampler.window(0.0, 3.0)["mean_watts"] == pytest.approx(1290e3 / 3 / 1e3)
    assert sampler.window(5.0, 6.0) is None and summarise(sampler.samples[:1], 700.0) is None


def test_summary_says_when_our_steps_ran_at_the_power_cap():
    def result(watts):
        side = {"tokens_per_second": 1000.0, "peak_gib": 1.0, "step_spread": 1.0}
        power = {"mean_watts": watts, "sm_mhz_median": 1620.0, "power_limit_watts": 700.0, "joules_per_step": 85.0}
        return {"workload": "w2", "gpu": "H200", "metric": "tokens/s", "ratio": 2.0, "median_step_ratio": 2.0,
                "baseline": dict(side, power=dict(power, mean_watts=647.0)), "ours": dict(side, power=power)}

    capped = summary(result(690.0))
    assert "watts" in capped and "  647 " in capped and "drew 690 W of GPU 0's 700 W cap (SM clock 1,620 MHz)" in capped
    assert "power-bound" not in summary(result(600.0))
    plain = summary({**result(690.0), "ours": {"tokens_per_second": 1.0, "peak_gib": 1.0},
                     "baseline": {"tokens_per_second": 1.0, "peak_gib": 1.0}})
    assert "watts" not in plain and "note" not in plain
