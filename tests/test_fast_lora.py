"""adapter.fast_lora: the fused LoRA update gives PEFT's outputs and gradients (fp64, to 1e-12), with and
without dropout, under autocast-like dtype mixing, and falls back to PEFT where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from zerotune import adapters
from zerotune.config import AdapterConfig
from zerotune.fast_lora import install_fast_lora, uninstall_fast_lora
from zerotune.train import token_loss_sum

from conftest import make_config


def _lora_model(path, dropout=0.0, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model = adapters.apply_method(model, AdapterConfig(r=4, alpha=8, dropout=dropout), seed=0)
    # PEFT starts B at zero; move it so the update (and every gradient through it) is not trivially zero
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.train()
    return model


def _loss_and_grads(model, ids, seed=0):
    torch.manual_seed(seed)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, tokens = token_loss_sum(model, batch)
    (loss / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return (loss / tokens).detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_lora_matches_peft_outputs_and_gradients(tiny_llama, dropout):
    stock = _lora_model(tiny_llama, dropout)
    fused = copy.deepcopy(stock)
    assert install_fast_lora(fused) == 2 * 7  # every adapted linear of both layers
    ids = torch.randint(5, 290, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_stock, grads_stock = _loss_and_grads(stock, ids)
    loss_fused, grads_fused = _loss_and_grads(fused, ids)
    assert loss_stock.item() != 0
    torch.testing.assert_close(loss_fused, loss_stock, rtol=1e-12, atol=1e-12)
    assert grads_fused.keys() == grads_stock.keys() and len(grads_stock) == 28
    for name in grads_stock:
        assert grads_stock[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_fused[name], grads_stock[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fast_lora_mixed_dtypes_follow_peft(tiny_llama):
    """bf16 base with fp32 adapters and no autocast: PEFT computes the update in fp32 and casts the sum back."""
    stock = _lora_model(tiny_llama, dtype=torch.bfloat16)
    assert next(p for n, p in stock.named_parameters() if "lora_A" in n).dtype == torch.float32
    fused = copy.deepcopy(stock)
    install_fast_lora(fused)
    ids = torch.randint(5, 290, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)


def test_fast_lora_falls_back_when_adapters_are_disabled_and_uninstalls(tiny_llama):
    stock = _lora_model(tiny_llama)
    fused = copy.deepcopy(stock)
    install_fast_lora(fused)
    ids = torch.randint(5, 290, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fused.disable_adapter(), stock.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
    uninstall_fast_lora(fused)
    assert not any("_zerotune_peft_forward" in m.__dict__ or "forward" in m.__dict__ for m in fused.modules())


def test_training_with_and_without_fast_lora_gives_the_same_losses(tiny_llama, alpaca_file, tmp_path,
                                                                    monkeypatch):
    from helpers import train
    from zerotune import fast_lora

    calls = []
    original = fast_lora._LoraUpdate.apply
    monkeypatch.setattr(fast_lora._LoraUpdate, "apply", lambda *a: calls.append(1) or original(*a))
    losses, used = {}, {}
    for flag in (True, False):
        config = make_config(tiny_llama, alpaca_file, tmp_path / str(flag), **{"adapter.fast_lora": flag})
        calls.clear()
        losses[flag] = train(config).losses
        used[flag] = len(calls)
    assert used[True] > 0 and used[False] == 0
    assert len(losses[True]) == 3 and losses[True][0] > losses[True][-1]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("settings,gathers", [
    ({"distributed.strategy": "deepspeed", "distributed.zero_stage": 3}, True),
    ({"distributed.strategy": "deepspeed", "distributed.zero_stage": 2}, False),
    ({"distributed.deepspeed_config": "examples/deepspeed_tutorial_zero3_offload.json"}, True),
])
def test_fast_lora_is_kept_off_where_zero3_gathers_per_module(settings, gathers, tiny_llama, alpaca_file, tmp_path):
    """ZeRO-3 only materialises a module's weights inside its own call, so the fused path (which reads
    lora_A/lora_B weights directly) must not be installed there."""
    from pathlib import Path

    from zerotune.strategies.deepspeed import DeepSpeedStrategy

    pytest.importorskip("deepspeed")
    if "distributed.deepspeed_config" in settings:
        root = Path(__file__).resolve().parents[1]
        settings = {"distributed.deepspeed_config": str(root / settings["distributed.deepspeed_config"])}
    config = make_config(tiny_llama, alpaca_file, tmp_path, **settings)
    assert DeepSpeedStrategy(config, torch.device("cpu")).gathers_per_module is gathers
