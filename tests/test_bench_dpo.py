"""`zerotune bench dpo`: zerotune's DPO against TRL's DPOTrainer with PEFT on the same pairs of token ids, in the
same order, with the same optimizer. Both start from ln 2 (a new adapter's B is zero, so the policy equals its
reference), train the same pairs and response tokens, and, on the CPU in fp32, follow the same losses."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math

import pytest

from zerotune.bench import ARCHITECTURES, WORKLOADS, lora_mfu, matmul_weights, run_bench, summary, token_records
from zerotune.bench.dpo import length_arguments
from zerotune.cli import main


@pytest.mark.slow
def test_tiny_dpo_trains_the_same_pairs_as_trl_and_starts_at_ln2(tmp_path, capsys):
    pytest.importorskip("trl")
    result = run_bench("dpo", tiny=True, steps=3, warmup=1, out_dir=str(tmp_path / "results"),
                       work_dir=str(tmp_path / "work"))
    written = json.loads((tmp_path / "results" / f"{result['date']}-cpu-dpo-tiny.json").read_text())
    ours, trl = written["ours"], written["peers"]["trl"]
    assert written["baselines"] == ["trl"] and written["metric"] == "pairs/s" and "baseline" not in written
    assert {"gpu", "date", "commit", "command"} <= written.keys()
    settings = written["settings"]
    assert (settings["objective"], settings["prompt_tokens"], settings["response_tokens"], settings["beta"],
            settings["micro_batch"]) == ("dpo", 64, 64, 0.1, 2)
    assert trl["description"] == "TRL DPOTrainer" and trl["packages"]["trl"] == importlib.metadata.version("trl")
    assert trl["settings"]["max_length"] == 128 and trl["settings"]["precompute_ref_log_probs"] is False
    assert trl["settings"]["loss_type"] == ["sigmoid"] and trl["settings"]["beta"] == 0.1

    # the same work: 2 timed steps of 2 pairs, each pair a 64-token prompt and two 64-token responses
    assert ours["timed_pairs"] == trl["timed_pairs"] == 4
    assert trl["timed_chosen_tokens"] == trl["timed_rejected_tokens"] == 4 * 64
    assert ours["timed_label_tokens"] == trl["timed_label_tokens"] == 4 * 2 * 64
    assert ours["timed_tokens"] == trl["timed_tokens"] == 4 * 2 * 128
    assert ours["trainable_parameters"] == trl["trainable_parameters"] == 2 * 16 * (
        (64 + 64) * 2 + (64 + 32) * 2 + (64 + 192) * 3)
    # a new adapter leaves the policy equal to its reference: -log sigmoid(0) on both sides; then the same pairs,
    # order, AdamW and clipping give the same losses
    assert ours["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert trl["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert len(ours["losses"]) == len(trl["losses"]) == 3
    assert ours["losses"] == pytest.approx(trl["losses"], rel=1e-5)
    assert ours["losses"][1] != pytest.approx(math.log(2), abs=1e-6)  # training moved the adapter

    for side in (ours, trl):
        assert side["pairs_per_second"] == pytest.approx(side["timed_pairs"] / sum(side["step_seconds"]))
    assert trl["pairs_per_second_ratio"] == pytest.approx(ours["pairs_per_second"] / trl["pairs_per_second"])
    out = capsys.readouterr().out
    assert "[bench] baseline: TRL DPOTrainer ..." in out and "ratio against trl: pairs/s" in out


def test_dpo_is_compared_with_trl_alone(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("zerotune.bench.run_bench", lambda name, **kwargs: seen.update(kwargs, name=name))
    assert main(["bench", "dpo", "--tiny", "--micro-batch", "3"]) == 0
    assert seen["baselines"] == ("trl",) and seen["micro_batch"] == 3
    assert main(["bench", "w1", "--tiny"]) == 0 and seen["baselines"] == ("hf",) and seen["micro_batch"] is None
    monkeypatch.undo()
    for baseline in ("hf", "trl,liger"):
        assert main(["bench", "dpo", "--tiny", "--baseline", baseline]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "workload dpo is compared with trl only; pass --baseline trl" in err, err


def test_dpo_pairs_are_random_token_ids_of_the_workload_lengths():
    workload = WORKLOADS["dpo"]
    records = token_records(workload, 32000, 3, seed=0)
    assert records == token_records(workload, 32000, 3, seed=0)  # deterministic
    assert all(len(r["prompt_ids"]) == len(r["chosen_ids"]) == len(r["rejected_ids"]) == 512 for r in records)
    assert records[0]["chosen_ids"] != records[0]["rejected_ids"]
    assert all(4 <= i < 32000 for r in records for ids in r.values() for i in ids)
    assert (workload.micro_batch, workload.checkpointing, WORKLOADS["dpo-ckpt"].checkpointing) == (2, False, True)


def test_trl_length_arguments_follow_its_version():
    @dataclasses.dataclass
    class OneLimit:  # TRL 1.15 and 1.16
        max_length: int = 1024

    @dataclasses.dataclass
    class ThreeLimits:  # older TRL
        max_length: int = 1024
        max_prompt_length: int = 512
        max_completion_length: int | None = None

    assert length_arguments(OneLimit, 512, 512) == {"max_length": 1024}
    assert length_arguments(ThreeLimits, 500, 524) == {"max_length": 1024, "max_prompt_length": 500,
                                                       "max_completion_length": 524}
    trl = pytest.importorskip("trl")
    assert length_arguments(trl.DPOConfig, 512, 512)["max_length"] == 1024


def test_dpo_mfu_counts_the_reference_forward():
    arch, tokens_per_second = ARCHITECTURES["llama-2-7b"], 1000.0
    weights, attention = matmul_weights(arch), arch["num_hidden_layers"] * arch["hidden_size"] * 1024
    plain = lora_mfu(tokens_per_second, arch, 1024, "H100")
    with_reference = lora_mfu(tokens_per_second, arch, 1024, "H100", reference=True)
    assert with_reference / plain == pytest.approx((6 * weights + 8 * attention) / (4 * weights + 6 * attention))


def test_summary_of_pairs_gives_pairs_per_second_and_first_losses():
    def side(pairs_per_second, peak):
        return {"pairs_per_second": pairs_per_second, "tokens_per_second": pairs_per_second * 2048,
                "median_step_tokens_per_second": pairs_per_second * 2048, "peak_gib": peak, "step_spread": 1.0,
                "losses": [0.6931471, 0.69]}

    result = {"workload": "dpo", "gpu": "H100", "metric": "pairs/s", "ours": side(8.0, 30.0),
              "peers": {"trl": side(4.0, 40.0) | {"pairs_per_second_ratio": 2.0, "ratio": 2.0,
                                                 "median_step_ratio": 2.0, "peak_memory_ratio": 0.75}}}
    text = summary(result)
    assert "pairs/s     tokens/s  LoRA-MFU  peak GiB first loss" in text
    assert "  trl            4.00        8,192         -      40.0   0.693147" in text
    assert "  zerotune       8.00       16,384         -      30.0   0.693147" in text
    assert "ratio against trl: pairs/s 2.00x, tokens/s 2.00x (at the median step 2.00x), peak memory x0.75" in text


def test_the_every_run_page_has_a_row_per_dpo_file():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_table.py"
    spec = importlib.util.spec_from_file_location("bench_table", script)
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    result = {"workload": "dpo", "gpu": "NVIDIA H100 80GB HBM3", "metric": "pairs/s", "commit": "abcdef0123",
              "command": "zerotune bench dpo --steps 20 --work-dir /tmp/x",
              "ours": {"pairs_per_second": 8.0, "peak_gib": 30.0, "losses": [0.6931472, 0.69]},
              "peers": {"trl": {"pairs_per_second": 4.0, "peak_gib": 40.0, "losses": [0.6931471, 0.69],
                                "pairs_per_second_ratio": 2.0}}}
    assert bench_table.is_pairs(result) and not bench_table.is_bench(result)
    row = bench_table.pair_table([("2026-12-08-h100-dpo.json", result)]).splitlines()[2]
    assert row == ("| dpo | H100 80GB HBM3 | 4.00 | 8.00 | **2.00x** | 40.0 / 30.0 | 0.693147 / 0.693147 | abcdef0 | "
                   "`zerotune bench dpo --steps 20` | `2026-12-08-h100-dpo.json` |")
