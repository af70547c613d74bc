"""Preference objectives under the engines on 2 CPU workers (gloo) against the single process at the same global
batch: per-step losses to 1e-5 relative, saved adapters to 1e-4 / 1e-6 (fp32; only the order of the gradient
sums differs). DPO's reference pass (the adapter switched off) runs inside each engine's wrapped model; ORPO and
SimPO run under one engine each (COVERING says why that covers the grid)."""

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


# A covering set of the engine x objective grid (5 two-worker runs, not 9): what differs between engines is
# DPO's reference pass inside the wrapped model, so DPO runs under every engine; what differs between objectives
# is host-side arithmetic on the pair log-probs, all-reduced through the one strategy interface, so ORPO (two
# terms under two normalisers, pairs and chosen tokens) and SimPO (length-normalised rewards) each run under one
# sharding engine, ORPO under ZeRO-3, whose engine runs its own backward, and SimPO under FSDP2.
COVERING = [("ddp", "dpo"), ("fsdp", "dpo"), ("zero3", "dpo"), ("zero3", "orpo"), ("fsdp", "simpo")]


@pytest.mark.parametrize(("engine", "objective"), COVERING)
def test_engine_matches_single_process(engine, objective, reference, tiny_llama, pairs_file, tmp_path):
    pytest.importorskip("deepspeed") if engine == "zero3" else None
    result = train(config(tiny_llama, pairs_file, tmp_path / "run", objective, **ENGINES[engine], **{
        "train.grad_accum": 2, "distributed.num_workers": 2, "distributed.use_cpu": True}))
    expected_losses, expected_adapter = reference[objective]
    assert result.strategy == ENGINES[engine]["distributed.strategy"]
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    assert_state_close(adapter_weights(tmp_path / "run"), expected_adapter, rtol=1e-4, atol=1e-6)


FULL_PRECOMPUTED = {"adapter.method": "full", "objective.reference": "precomputed", "train.lr": 1e-3,
                    "data.eval_fraction": 0.1}


@pytest.fixture(scope="module")
def full_precomputed_single(tiny_llama, pairs_file, tmp_path_factory):
    """The one-process full fine-tune both sharding engines are compared with (run once for both)."""
    out = tmp_path_factory.mktemp("full-precomputed") / "single"
    return train(config(tiny_llama, pairs_file, out, "dpo", **FULL_PRECOMPUTED, **{"train.grad_accum": 4}))


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_full_finetune_dpo_with_precomputed_reference_under_sharding_engines(engine, full_precomputed_single,
                                                                             tiny_llama, pairs_file, tmp_path):
    """Full fine-tuning's DPO under FSDP2 and ZeRO-3: the reference log-probs precomputed by the sharded model
    (each worker a share, every worker the same number of forwards) give the one-process run's losses."""
    pytest.importorskip("deepspeed") if engine == "zero3" else None
    sharded = train(config(tiny_llama, pairs_file, tmp_path / "sharded", "dpo", **FULL_PRECOMPUTED,
                           **ENGINES[engine], **{"train.grad_accum": 2, "distributed.num_workers": 2,
                                                 "distributed.use_cpu": True}))
    single = full_precomputed_single
    torch.testing.assert_close(torch.tensor(sharded.losses), torch.tensor(single.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(sharded.eval_losses), torch.tensor(single.eval_losses), rtol=1e-5,
                               atol=0)
