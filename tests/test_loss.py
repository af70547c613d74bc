"""The chunked cross-entropy (model.chunked_loss) against the stock logits-then-cross-entropy path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from zerotune import adapters
from zerotune.config import AdapterConfig
from zerotune.data.batches import collate
from zerotune.data.encode import EncodedExample
from zerotune.data.packing import pack_examples
from zerotune.speed.chunked_loss import ALL_ROWS, install_chunked_loss, linear_cross_entropy_sum
from zerotune.step import token_loss_sum

from helpers import train


@pytest.mark.parametrize("weight_trains,host_count,compiled", [
    (False, False, False), (True, False, False), (True, True, False), (True, "all", False),
    (True, True, True), (False, "all", True)])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(weight_trains, host_count, compiled):
    """Eager, and with each chunk's softmax and gradient through torch.compile (as under --compile)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (37,))
    labels[::4] = -100
    count = int((labels != -100).sum()) if host_count else None  # the sync-free row lookup when known
    if host_count == "all":
        count = ALL_ROWS  # every row at fixed shapes, -100 rows weighing zero (CUDA graphs)
    ours = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=5, label_count=count,  # 6 chunks
                                    compiled=compiled)
    ours.mul(0.37).backward()
    ours_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight_trains else [])
    hidden.grad = None
    weight.grad = None
    stock = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    stock.mul(0.37).backward()
    stock_grads = [hidden.grad] + ([weight.grad] if weight_trains else [])
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(ours_grads, stock_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours_grads[0][0], torch.zeros(16, dtype=torch.float64)) or labels[0] == -100


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="F.linear_cross_entropy is new in torch 2.13")
@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("torch_chunks", [False, True])
def test_chunked_loss_equals_torch_linear_cross_entropy(weight_trains, torch_chunks):
    """Ours against torch's own fused loss, its reference path (options=None) and its chunked op (4 rows a
    chunk), in fp64: what benchmarks/linear_cross_entropy.py compares computes the same thing."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (37,))
    labels[::4] = -100

    def loss_and_grads(loss_of):
        hidden.grad = weight.grad = None
        loss = loss_of()
        loss.mul(0.37).backward()
        return [loss.detach(), hidden.grad] + ([weight.grad] if weight_trains else [])

    ours = loss_and_grads(lambda: linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=5))
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if torch_chunks else None
    theirs = loss_and_grads(lambda: F.linear_cross_entropy(hidden, weight, labels, reduction="sum",
                                                           ignore_index=-100, options=options))
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    assert ours[0] > 0 and ours[1].abs().sum() > 0


def test_compiled_chunk_math_equals_eager_in_bf16():
    """The compiled chunk math reads bf16 logits and writes the bf16 gradient without an fp32 copy in memory;
    its values are the eager path's: the loss to fp32 reordering, the gradient to one bf16 rounding."""
    from zerotune.speed.chunked_loss import chunk_loss_and_grad, compiled_chunk_math

    torch.manual_seed(0)
    logits = (torch.randn(24, 301) * 4).to(torch.bfloat16)
    target = torch.randint(0, 301, (24,))
    keep = (torch.arange(24) % 5 != 0).float()
    for weight_of_row in (None, keep):
        eager_total, eager_grad = chunk_loss_and_grad(logits.clone(), target, weight_of_row, True)
        total, grad = compiled_chunk_math()(logits.clone(), target, weight_of_row, True)
        torch.testing.assert_close(total, eager_total, rtol=1e-6, atol=0)
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, eager_grad, rtol=8e-3, atol=1e-6)
    total, grad = compiled_chunk_math()(logits, target, None, False)
    assert grad is None and torch.isclose(total, eager_total.new_tensor(float(
        F.cross_entropy(logits.float(), target, reduction="sum"))), rtol=1e-6)


def _lora_model(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    return adapters.apply_method(model, AdapterConfig(dropout=0.0), seed=0)


def _loss_and_grads(model, batch, head):
    model.zero_grad(set_to_none=True)
    loss, tokens = token_loss_sum(model, batch, head)
    loss.backward()
    return loss.detach(), tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
def test_model_loss_through_the_head_equals_stock(tiny_llama, packed):
    examples = [EncodedExample(list(range(3, 3 + n)), [-100] * (n // 3) + list(range(3 + n // 3, 3 + n)))
                for n in (9, 23, 14, 30)]
    if packed:
        rows, _ = pack_examples(examples, 64)
        batch = collate(rows, 0)
    else:
        batch = collate(examples, 0)
    model = _lora_model(tiny_llama)
    stock = _loss_and_grads(model, batch, None)
    head, why_not = install_chunked_loss(model)
    assert why_not is None
    head.chunk_tokens = 7
    chunked = _loss_and_grads(model, batch, head)
    torch.testing.assert_close(chunked[0], stock[0], rtol=1e-6, atol=1e-6)
    assert int(chunked[1]) == int(stock[1]) > 0
    for name in stock[2]:
        torch.testing.assert_close(chunked[2][name], stock[2][name], rtol=1e-4, atol=1e-6)
    # outside token_loss_sum the head gives logits again (generation keeps working)
    logits = model(input_ids=batch["input_ids"][:1, :5]).logits
    assert logits.shape == (1, 5, model.config.vocab_size)


def test_full_finetune_trains_the_head_the_same(config_for):
    """Full fine-tuning of a tied-embedding model: per-step losses equal with and without chunking."""
    stock = train(config_for(**{"adapter.method": "full", "model.chunked_loss": False, "train.lr": 1e-3}))
    config = config_for(**{"adapter.method": "full", "model.chunked_loss": True, "train.lr": 1e-3,
                           "output.dir": str(stock.output_dir) + "-chunked"})
    chunked = train(config)
    assert len(chunked.losses) == 3
    assert chunked.losses == pytest.approx(stock.losses, rel=1e-5)
    assert chunked.losses[-1] < chunked.losses[0]


def test_models_the_chunked_loss_cannot_serve_keep_the_stock_loss(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    head, why_not = install_chunked_loss(model)
    assert head is None and "final_logit_softcapping" in why_not


def test_chunk_rows_and_the_plans_copy_of_them():
    from zerotune.speed.chunked_loss import CHUNK_ELEMENTS, MIN_CHUNK_TOKENS, chunk_tokens_for
    from zerotune.plan import calibration

    assert chunk_tokens_for(32000) == 524  # 2**24 elements
    assert chunk_tokens_for(128256) == 512  # the floor: 130 rows would make the head GEMMs memory-bound
    assert (calibration.CHUNK_ELEMENTS, calibration.MIN_CHUNK_TOKENS) == (CHUNK_ELEMENTS, MIN_CHUNK_TOKENS)
