"""Preference objectives on the fast path: per-token log-probabilities from the chunked head (no [batch, seq, vocab]
logits) and the fused projections give the plain path's losses and gradients (CPU, fp32, 1e-5)."""

import contextlib
import copy
import types

import pytest
import torch

from helpers import random_adapters
from zerotune import adapters
from zerotune.config import AdapterConfig, ObjectiveConfig
from zerotune.data.pairs import EncodedPair, collate_pairs
from zerotune.objectives import create_objective, pair_scorer
from zerotune.objectives.step import Reference
from zerotune.speed.chunked_loss import ChunkedLossHead, install_chunked_loss, linear_token_logps
from zerotune.speed import fused_projections
from zerotune.speed.fused_check import install_checked
from zerotune.tiny import build_model

TOLERANCE = dict(rtol=1e-5, atol=1e-6)
VOCAB = 300
OBJECTIVES = ["dpo", "orpo", "simpo"]


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("host_count", [False, True])
def test_chunked_token_logps_and_gradients_equal_log_softmax(weight_trains, host_count):
    """fp64, 6 chunks, every fourth row unscored, a random upstream gradient per row (as an objective gives)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (37,))
    targets[::4] = -100
    upstream = torch.randn(37, dtype=torch.float64)
    count = int((targets != -100).sum()) if host_count else None

    def values_and_grads(logps_of):
        hidden.grad = weight.grad = None
        logps = logps_of()
        (logps * upstream).sum().backward()
        return [logps.detach(), hidden.grad] + ([weight.grad] if weight_trains else [])

    ours = values_and_grads(lambda: linear_token_logps(hidden, weight, targets, chunk_tokens=5, target_count=count))
    stock = values_and_grads(lambda: torch.log_softmax(hidden @ weight.t(), -1).gather(
        1, targets.clamp(min=0)[:, None]).squeeze(1) * (targets != -100))
    for mine, theirs in zip(ours, stock, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert ours[0][1] != 0 and ours[0][0] == 0 and ours[1][0].abs().sum() == 0 and ours[1][1].abs().sum() > 0


def test_no_gradient_work_without_grad():
    """The reference pass and evaluation run under no_grad: nothing is kept for a backward."""
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    with torch.no_grad():
        logps = linear_token_logps(hidden, weight, torch.randint(0, 50, (8,)))
    assert logps.grad_fn is None


def pair_batch() -> dict[str, torch.Tensor]:
    """Three pairs of different prompt and response lengths (right-padded rows)."""
    generator = torch.Generator().manual_seed(2)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    pairs = [EncodedPair(tokens(p), tokens(c), tokens(r)) for p, c, r in ((5, 4, 7), (9, 3, 3), (2, 8, 5))]
    return collate_pairs(pairs, pad_token_id=0)


def lora_llama():
    """Grouped-query attention; random nonzero adapters, so the policy differs from the reference."""
    model = build_model("llama", VOCAB, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    return random_adapters(adapters.apply_method(model, AdapterConfig(r=8, alpha=16, dropout=0.0), seed=0))


def one_step(model, objective, batch, scorer, reference: Reference | None = None):
    """The loss of one micro-batch as PreferenceStep computes it (one rank), backpropagated; the loss, and the
    gradient of every trainable weight."""
    model.zero_grad()
    strategy = types.SimpleNamespace(unwrap=lambda m: m)
    reference = reference or Reference(strategy, scorer=scorer)
    count = scorer.count(batch)
    scores = reference.scores(model, batch, count) if objective.uses_reference else None
    result = objective(scorer(model, batch, count), scores)
    loss = sum(term / total for term, total in zip(result.terms, objective.normalisers(batch)))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(left, right):
    torch.testing.assert_close(left[0], right[0], **TOLERANCE)
    assert left[1].keys() == right[1].keys() and left[1]
    for name in left[1]:
        torch.testing.assert_close(left[1][name], right[1][name], **TOLERANCE, msg=lambda m: f"{name}: {m}")


def head_outputs(model, shapes: list | None = None) -> list[tuple]:
    """The shapes the output head returns, recorded from now on (into ``shapes``, if given)."""
    shapes = [] if shapes is None else shapes
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    return shapes


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_chunked_scores_give_the_logits_losses_and_lora_gradients(objective_name):
    objective = create_objective(ObjectiveConfig(name=objective_name, beta=0.3, simpo_gamma=0.4))
    batch = pair_batch()
    plain_model, chunked_model = lora_llama(), lora_llama()
    plain = one_step(plain_model, objective, batch, pair_scorer(objective))
    head, why_not = install_chunked_loss(chunked_model)
    assert why_not is None
    shapes = head_outputs(chunked_model)
    chunked = one_step(chunked_model, objective, batch, pair_scorer(objective, head))
    assert_same(chunked, plain)
    assert plain[0] > 0 and all(g.abs().sum() > 0 for g in plain[1].values())
    # no [rows, length, vocab] logits: the head returned one log-probability per position, in every forward
    assert shapes and all(shape == batch["input_ids"].shape for shape in shapes)
    assert len(shapes) == (2 if objective.uses_reference else 1)


def test_orpo_scores_the_chosen_prompts_and_the_others_do_not():
    """ORPO's NLL term needs the chosen sequences' prompt tokens; DPO and SimPO score only the responses."""
    batch = pair_batch()
    responses = int((batch["labels"][:, 1:] != -100).sum())
    chosen_prompts = int(batch["attention_mask"][:3, 1:].sum() - (batch["labels"][:3, 1:] != -100).sum())
    counts = {name: pair_scorer(create_objective(ObjectiveConfig(name=name))).count(batch) for name in OBJECTIVES}
    assert counts == {"dpo": responses, "orpo": responses + chosen_prompts, "simpo": responses}


def test_full_finetuning_trains_the_head_through_the_chunked_scores():
    """--method full: the head's weight trains, its gradient computed again in the backward; the frozen reference
    copy scores through its own chunked head."""
    objective = create_objective(ObjectiveConfig(name="dpo", beta=0.3))
    batch = pair_batch()

    def full_model():
        model = build_model("llama", VOCAB, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        with torch.no_grad():  # the policy has moved away from its reference
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
        return model.train(), frozen

    strategy = types.SimpleNamespace(unwrap=lambda m: m)
    model, frozen = full_model()
    plain = one_step(model, objective, batch, pair_scorer(objective), Reference(strategy, frozen))
    model, frozen = full_model()
    scorer = pair_scorer(objective, install_chunked_loss(model)[0])
    reference = Reference(strategy, frozen, scorer, pair_scorer(objective, ChunkedLossHead(frozen)))
    shapes = head_outputs(frozen, head_outputs(model))
    chunked = one_step(model, objective, batch, scorer, reference)
    assert_same(chunked, plain)
    assert "lm_head.weight" in chunked[1] and chunked[1]["lm_head.weight"].abs().sum() > 0
    assert len(shapes) == 2 and all(shape == batch["input_ids"].shape for shape in shapes)


@pytest.mark.parametrize("objective_name", ["dpo", "orpo"])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_projections_give_the_same_preference_losses_and_gradients(objective_name, chunked, monkeypatch):
    """DPO's reference pass multiplies the adapters' contribution by zero (adapters_zeroed): it runs the fused
    groups as the policy does, so the reference is the base's, computed by the policy's own kernels."""
    objective = create_objective(ObjectiveConfig(name=objective_name, beta=0.3))
    batch = pair_batch()
    plain_model, fused_model = lora_llama(), lora_llama()
    plain = one_step(plain_model, objective, batch, pair_scorer(objective))
    groups, why_not = install_checked(fused_model, contextlib.nullcontext)
    assert groups == 8 and why_not is None
    head = install_chunked_loss(fused_model)[0] if chunked else None
    fused_calls = []
    group_parts = fused_projections._group_parts
    monkeypatch.setattr(fused_projections, "_group_parts", lambda *args: fused_calls.append(1) or group_parts(*args))
    fused = one_step(fused_model, objective, batch, pair_scorer(objective, head))
    assert_same(fused, plain)
    # q/k/v, o and down of each of the two layers (gate/up go through the SwiGLU MLP's forward), in the policy's
    # forward and, for DPO, in the reference pass too
    assert len(fused_calls) == 2 * 3 * (2 if objective_name == "dpo" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("objective_name", ["dpo", "orpo"])
def test_a_run_on_the_fast_path_gives_the_plain_runs_losses(objective_name, tiny_llama, pairs_file, tmp_path):
    """The CLI's run: chunked scores and fused projections (on, as on a CPU it must be asked for) against the
    logits and PEFT's forwards, three steps and an evaluation, to 1e-5; resolved.yaml says what each run decided."""
    from conftest import make_config
    from helpers import train

    def run(name, **overrides):
        config = make_config(tiny_llama, pairs_file, tmp_path / name, **{
            "objective.name": objective_name, "data.eval_fraction": 0.25, "train.eval_every": 3, **overrides})
        result = train(config)
        return result, (tmp_path / name / "resolved.yaml").read_text()

    plain, plain_settings = run("plain", **{"model.chunked_loss": False, "adapter.fused_projections": "off"})
    fast, fast_settings = run("fast", **{"adapter.fused_projections": "on"})
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(fast.eval_losses), torch.tensor(plain.eval_losses), rtol=1e-5, atol=0)
    assert len(fast.losses) == 3 and len(fast.eval_losses) == 2
    assert "chunked_loss: true" in fast_settings and "fused_projections: true" in fast_settings
    assert "chunked_loss: false" in plain_settings and "fused_projections: false" in plain_settings
