"""The reference pass of LoRA preference tuning: the adapters' contribution multiplied by zero
(objectives.step.adapters_zeroed), not skipped. On CPU: the same scores as PEFT's disable_adapter, every
scaling restored, the random-number stream untouched by dropout in the pass. On a GPU (marked gpu): a DPO run
on the default fast path (bf16, compiled layers, fused projections, chunked scores) starts at ln 2 exactly,
as a reference equal to the untrained policy must."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zerotune import adapters
from zerotune.config import AdapterConfig, ObjectiveConfig
from zerotune.data.pairs import EncodedPair, collate_pairs
from zerotune.objectives import create_objective, pair_scorer
from zerotune.objectives.step import adapters_zeroed
from zerotune.tiny import build_model


def lora_llama(dropout: float):
    from helpers import random_adapters

    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    return random_adapters(adapters.apply_method(model, AdapterConfig(r=8, alpha=16, dropout=dropout), seed=0))


def batch():
    generator = torch.Generator().manual_seed(2)
    tokens = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 4, 7, 9, 3, 3)]
    return collate_pairs([EncodedPair(*tokens[:3]), EncodedPair(*tokens[3:])], pad_token_id=0)


def test_zeroed_adapters_score_as_disabled_ones_and_are_restored():
    model, pairs = lora_llama(dropout=0.0), batch()
    scorer = pair_scorer(create_objective(ObjectiveConfig(name="dpo")))
    from peft.tuners.lora import LoraLayer

    scalings = [dict(m.scaling) for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        policy = scorer(model, pairs)
        with model.disable_adapter():
            disabled = scorer(model, pairs)
        with adapters_zeroed(model):
            zeroed = scorer(model, pairs)
    torch.testing.assert_close(zeroed.chosen, disabled.chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zeroed.rejected, disabled.rejected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(policy.chosen, zeroed.chosen)  # the random adapters do change the policy
    assert [dict(m.scaling) for m in model.modules() if isinstance(m, LoraLayer)] == scalings
    assert scalings and all(value != 0 for scaling in scalings for value in scaling.values())


def test_dropout_in_the_reference_pass_draws_nothing_from_the_policys_stream():
    model, pairs = lora_llama(dropout=0.3), batch()
    model.train()
    scorer = pair_scorer(create_objective(ObjectiveConfig(name="dpo")))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with torch.no_grad(), adapters_zeroed(model):
        scorer(model, pairs)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dpo_on_the_gpu_fast_path_starts_at_ln2(tmp_path, pairs_file):
    """PEFT's disable_adapter in the reference pass gave a first loss of 0.776 on a 7B (the skipped adapters
    run other matmul shapes than the fused policy's, rounding otherwise in bf16)."""
    from conftest import corpus
    from zerotune.cli import main
    from zerotune.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", corpus(), "llama", vocab_size=300, hidden_size=2048, layers=2,
                            heads=16, intermediate_size=5504, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(pairs_file), "--objective", "dpo", "--dtype", "bf16",
                 "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0", "--max-seq-len", "128",
                 "--tracking", "none", "--output-dir", str(out), "--quiet"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "fused_projections: true" in (out / "resolved.yaml").read_text()
    assert (first["rewards/chosen"], first["rewards/rejected"]) == (0.0, 0.0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
