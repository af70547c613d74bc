"""`zerotune bench --baseline`: each peer trains the same workload as HF+PEFT and zerotune (same tokens, same
trainable parameters, same first loss), and a peer that cannot run here says why instead of giving figures."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from zerotune.bench import run_bench, summary
from zerotune.bench.peers import PEERS, Peer, cannot_do, unavailable
from zerotune.cli import main

TINY_SPEC = {"tiny": True}


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["w1", "w3"])
def test_trl_trains_the_workload_hf_and_zerotune_train(workload, tmp_path):
    pytest.importorskip("trl")
    result = run_bench(workload, tiny=True, steps=3, warmup=1, out_dir=str(tmp_path / "results"),
                       work_dir=str(tmp_path / "work"), baselines=("hf", "trl", "liger", "unsloth"))
    written = json.loads((tmp_path / "results" / f"{result['date']}-cpu-{workload}-tiny.json").read_text())
    ours, hf, trl = written["ours"], written["baseline"], written["peers"]["trl"]
    assert written["baselines"] == ["hf", "trl", "liger", "unsloth"]
    # the same model: LoRA r16 on every linear layer of 2 layers of the tiny Llama (d 64, kv 32, ffn 192)
    lora = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 192) * 3)
    assert ours["trainable_parameters"] == hf["trainable_parameters"] == trl["trainable_parameters"] == lora
    assert trl["timed_steps"] == ours["timed_steps"] == 2 and len(trl["losses"]) == 3
    assert trl["ratio"] == pytest.approx(ours["tokens_per_second"] / trl["tokens_per_second"])
    assert trl["packages"]["trl"] == importlib.metadata.version("trl")
    assert trl["settings"]["optim"] == "adamw_torch" and trl["settings"]["max_grad_norm"] == 1.0
    if workload == "w1":
        # full rows in HF+PEFT's order: every side trains the same tokens and starts from the same loss; TRL clips
        # gradients at 1.0 as zerotune does, so their later losses agree too
        assert trl["timed_tokens"] == hf["timed_tokens"] == ours["timed_tokens"] == 2 * 128
        assert trl["timed_label_tokens"] == hf["timed_label_tokens"] == ours["timed_label_tokens"] == 2 * 127
        assert trl["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-5)
        assert trl["losses"] == pytest.approx(ours["losses"], rel=1e-4)
        assert trl["settings"]["packing"] is False
    else:
        # W3: TRL packs (best-fit decreasing, padding-free) rows of the workload's length; HF+PEFT pads
        assert trl["settings"]["packing"] is True and trl["settings"]["padding_free"] is True
        assert trl["real_token_fraction"] == 1.0 > hf["real_token_fraction"]
        assert trl["timed_tokens"] > hf["timed_tokens"]
    for peer in ("liger", "unsloth"):  # no CUDA GPU here: said in the file, no figures
        side = written["peers"][peer]
        assert side["not_available"].startswith("not available on this machine: ")
        assert "tokens_per_second" not in side and "ratio" not in side


def test_a_peer_that_is_not_installed_or_needs_a_gpu_says_so():
    missing = Peer("nothing", "a peer not installed", ("zerotune_no_such_module",), ("zerotune-no-such-package",))
    assert unavailable(missing, TINY_SPEC) == ("not available on this machine: zerotune_no_such_module is not "
                                               "installed (pip install 'zerotune[peers]' installs trl; liger-kernel "
                                               "and unsloth need a CUDA GPU)")
    gpu_only = Peer("gpu", "a GPU peer", ("json",), (), needs_cuda="its kernels need a CUDA GPU")
    assert unavailable(gpu_only, TINY_SPEC) == ("not available on this machine: its kernels need a CUDA GPU "
                                                "(--tiny runs on the CPU)")
    broken = Peer("broken", "a peer whose import fails", ("json.zerotune_no_such_module",), ())
    assert unavailable(broken, TINY_SPEC).startswith(
        "not available on this machine: import json.zerotune_no_such_module: ModuleNotFoundError: No module named")
    assert cannot_do("unsloth", 2).startswith("not measured: this workload runs on 2 GPUs")
    assert cannot_do("unsloth", 1) is None
    assert set(PEERS) == {"trl", "liger", "unsloth"}


def test_bench_reads_several_baselines_and_refuses_unknown_ones(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("zerotune.bench.run_bench", lambda name, **kwargs: seen.update(kwargs, name=name))
    assert main(["bench", "w1", "--tiny", "--baseline", "hf,trl", "--baseline", "unsloth"]) == 0
    assert seen["baselines"] == ("hf", "trl", "unsloth") and seen["name"] == "w1"
    assert main(["bench", "w1", "--tiny"]) == 0 and seen["baselines"] == ("hf",)
    with pytest.raises(SystemExit):
        main(["bench", "w1", "--tiny", "--baseline", "hf,axolotl"])
    assert "'hf,axolotl': choose from hf, trl, liger, unsloth" in capsys.readouterr().err


def test_summary_gives_a_ratio_per_peer_and_why_a_peer_has_none():
    def side(tokens_per_second, peak):
        return {"tokens_per_second": tokens_per_second, "median_step_tokens_per_second": tokens_per_second,
                "peak_gib": peak, "step_spread": 1.0}

    ours = side(20000.0, 20.0)
    result = {"workload": "w1", "gpu": "H100", "metric": "tokens/s", "ours": ours,
              "peers": {"trl": side(10000.0, 25.0) | {"ratio": 2.0, "median_step_ratio": 2.0, "peak_memory_ratio": 0.8},
                        "unsloth": {"not_available": "not available on this machine: import unsloth: ImportError: x"}}}
    text = summary(result)
    assert "  trl              10,000" in text and "  zerotune         20,000" in text
    assert "ratio against trl: 2.00x (at the median step 2.00x), peak memory x0.80" in text
    assert "unsloth: not available on this machine: import unsloth: ImportError: x" in text
    assert "HF+PEFT" not in text  # no stock baseline was asked for
