"""Preference objectives under each engine on 2 CPU workers (gloo) against the single process at the same global
batch: per-step losses to 1e-5 relative, saved adapters to 1e-4 / 1e-6 (fp32; only the order of the gradient
sums differs). DPO's reference pass (the adapter switched off) runs inside each engine's wrapped model."""

import pytest
import torch

from conftest import assert_state_close, make_config
from helpers import adapter_weights, train

pytestmark = pytest.mark.slow

STEPS = 3
ENGINES = {
    "ddp": {"distributed.strategy": "ddp"},
    "fsdp": {"distributed.strategy": "fsdp"},
    "zero3": {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3},
}


def config(tiny_llama, pairs_file, output, objective, **extra):
    return make_config(tiny_llama, pairs_file, output, **{"objective.name": objective, "train.max_steps": STEPS,
                                                          "train.batch_size": 2, **extra})


@pytest.fixture(scope="module")
def reference(tiny_llama, pairs_file, tmp_path_factory):
    """One process, batch 2 x grad_accum 4: the global batch of 8 pairs that 2 workers x 2 x 2 see."""
    runs = {}
    for objective in ("dpo", "orpo", "simpo"):
        out = tmp_path_factory.mktemp(objective) / "run"
        runs[objective] = train(config(tiny_llama, pairs_file, out, objective, **{"train.grad_accum": 4})).losses, \
            adapter_weights(out)
    return runs


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_single_process(engine, objective, reference, tiny_llama, pairs_file, tmp_path):
    pytest.importorskip("deepspeed") if engine == "zero3" else None
    result = train(config(tiny_llama, pairs_file, tmp_path / "run", objective, **ENGINES[engine], **{
        "train.grad_accum": 2, "distributed.num_workers": 2, "distributed.use_cpu": True}))
    expected_losses, expected_adapter = reference[objective]
    assert result.strategy == ENGINES[engine]["distributed.strategy"]
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    assert_state_close(adapter_weights(tmp_path / "run"), expected_adapter, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_full_finetune_dpo_with_precomputed_reference_under_sharding_engines(engine, tiny_llama, pairs_file,
                                                                             tmp_path):
    """Full fine-tuning's DPO under FSDP2 and ZeRO-3: the reference log-probs precomputed by the sharded model
    (each worker a share, every worker the same number of forwards) give the one-process run's losses."""
    pytest.importorskip("deepspeed") if engine == "zero3" else None
    settings = {"adapter.method": "full", "objective.reference": "precomputed", "train.lr": 1e-3,
                "data.eval_fraction": 0.1}
    single = train(config(tiny_llama, pairs_file, tmp_path / "single", "dpo", **settings, **{"train.grad_accum": 4}))
    sharded = train(config(tiny_llama, pairs_file, tmp_path / "sharded", "dpo", **settings, **ENGINES[engine], **{
        "train.grad_accum": 2, "distributed.num_workers": 2, "distributed.use_cpu": True}))
    torch.testing.assert_close(torch.tensor(sharded.losses), torch.tensor(single.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(sharded.eval_losses), torch.tensor(single.eval_losses), rtol=1e-5,
                               atol=0)
