"""The documented --strategy auto rule."""

import pytest

from zerotune.config import build_config
from zerotune.launchers import choose_launcher
from zerotune.model import training_state_bytes
from zerotune.resolve import Machine, choose_strategy


def test_training_state_counts_weights_and_adam(tiny_llama):
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    full = build_config({"model.name": str(tiny_llama), "model.dtype": "bf16", "adapter.method": "full"})
    lora = build_config({"model.name": str(tiny_llama), "model.dtype": "bf16"})
    assert training_state_bytes(full) == params * 2 + params * 16
    assert params * 2 < training_state_bytes(lora) < params * 2.5


@pytest.mark.parametrize("state_gib, expected", [(10, "ddp"), (60, "fsdp")])
def test_auto_picks_ddp_when_it_fits_else_fsdp(state_gib, expected, monkeypatch):
    """A GPU the planner does not know (no name): the fit rule decides, on any host running the test."""
    monkeypatch.setattr("zerotune.model.training_state_bytes", lambda config: state_gib * 2**30)
    gpu = Machine("cuda", gpu_name=None, gpu_memory_bytes=80 * 2**30, gpus_per_host=2)
    config = build_config({})
    assert choose_strategy(config, 2, gpu) == expected
    assert choose_strategy(config, 1, gpu) == "single"
    assert choose_strategy(config, 2, Machine("cpu")) == "ddp"


def test_auto_asks_the_planner_for_a_gpu_it_knows(tiny_llama):
    """On a known GPU the planner's pick wins, with its reason (the same answer on a CPU or a GPU host)."""
    from zerotune.plan.report import auto_engine
    from zerotune.resolve import explain_strategy

    config = build_config({"model.name": "meta-llama/Llama-2-7b-hf"})
    h100 = Machine("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, 8)
    expected = auto_engine(config, 2, h100.gpu_name, h100.gpus_per_host)
    assert expected is not None and explain_strategy(config, 2, h100) == expected


def test_explicit_and_deepspeed_json_choices():
    assert choose_strategy(build_config({"distributed.deepspeed_config": "x.json"}), 2) == "deepspeed"
    assert choose_strategy(build_config({"distributed.deepspeed_config": "x.json",
                                         "distributed.no_deepspeed": True}), 2) == "ddp"
    assert choose_strategy(build_config({"distributed.strategy": "fsdp"}), 1) == "fsdp"


def test_launcher_rule(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_launcher(build_config({})) == "inprocess"
    assert choose_launcher(build_config({"distributed.num_workers": 2})) == "local"
    assert choose_launcher(build_config({"distributed.ray_address": "auto"})) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_launcher(build_config({"distributed.num_workers": 4})) == "ray"
