"""The documented --strategy auto rule."""

from types import SimpleNamespace

import pytest
import torch

from zerotune.config import build_config
from zerotune.launchers import choose_launcher
from zerotune.model import training_state_bytes
from zerotune.train import choose_strategy


def test_training_state_counts_weights_and_adam(tiny_llama):
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    full = build_config({"model.name": str(tiny_llama), "model.dtype": "bf16", "adapter.method": "full"})
    lora = build_config({"model.name": str(tiny_llama), "model.dtype": "bf16"})
    assert training_state_bytes(full) == params * 2 + params * 16
    assert params * 2 < training_state_bytes(lora) < params * 2.5


@pytest.mark.parametrize("state_gib, expected", [(10, "ddp"), (60, "fsdp")])
def test_auto_picks_ddp_when_it_fits_else_fsdp(state_gib, expected, monkeypatch):
    monkeypatch.setattr("zerotune.model.training_state_bytes", lambda config: state_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    config = build_config({})
    assert choose_strategy(config, 2, torch.device("cuda", 0)) == expected
    assert choose_strategy(config, 1, torch.device("cuda", 0)) == "single"
    assert choose_strategy(config, 2, torch.device("cpu")) == "ddp"


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
