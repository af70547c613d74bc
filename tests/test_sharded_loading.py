"""--sharded-loading (FSDP2): built on the meta device, each rank reads only its own rows of every weight."""

from __future__ import annotations

import json

import pytest

from conftest import make_config
from helpers import train
from zerotune.config import build_config
from zerotune.errors import ConfigError
from zerotune.strategies.sharded_loading import checkpoint_name

pytestmark = pytest.mark.slow


def _fsdp(tiny_llama, alpaca_file, output, **extra):
    settings = {"distributed.num_workers": 2, "distributed.use_cpu": True, "distributed.strategy": "fsdp",
                "train.batch_size": 2, "train.max_steps": 2, "data.eval_fraction": 0.1, "train.eval_every": 100}
    settings.update(extra)
    return make_config(tiny_llama, alpaca_file, output, **settings)


def test_lora_starts_from_the_same_weights_as_the_default_path(tiny_llama, alpaca_file, tmp_path):
    sharded = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "sharded", **{"distributed.sharded_loading": True}))
    # one process, the same global batch (2 x grad_accum 2), weights loaded the usual way
    plain = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "plain", **{"distributed.num_workers": 1,
                                                                         "distributed.strategy": "single",
                                                                         "train.grad_accum": 2}))
    # the step-0 eval loss (eval_every > max_steps: evaluated at 0 and at the end) and the step-1 loss see only
    # the base weights (LoRA B starts at zero)
    assert sharded.eval_losses[0] == pytest.approx(plain.eval_losses[0], rel=1e-6)
    assert sharded.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    saved = json.loads((tmp_path / "sharded" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and (tmp_path / "sharded" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_finetune_trains_identically(tiny_llama, alpaca_file, tmp_path):
    extra = {"adapter.method": "full", "train.lr": 1e-3, "train.max_steps": 3, "data.eval_fraction": 0.0}
    sharded = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "sharded", **extra,
                          **{"distributed.sharded_loading": True}))
    plain = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "plain", **extra, **{
        "distributed.num_workers": 1, "distributed.strategy": "single", "train.grad_accum": 2}))
    assert sharded.losses == pytest.approx(plain.losses, rel=1e-5)


def test_names_map_to_the_files_and_bad_combinations_are_refused():
    assert checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert checkpoint_name("model.norm.weight") == "model.norm.weight"
    for extra in ({"distributed.strategy": "ddp"}, {"distributed.strategy": "fsdp", "adapter.method": "qlora"},
                  {"distributed.strategy": "fsdp", "model.init": "random"}):
        with pytest.raises(ConfigError, match="sharded_loading needs --strategy fsdp"):
            build_config({"distributed.sharded_loading": True, **extra})
