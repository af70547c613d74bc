"""--packing with a preference objective: each micro-batch's chosen and rejected sequences packed into rows of
up to data.max_seq_len tokens, each a segment with its own position ids (zerotune.data.pairs.pack_sequences),
the per-token log-probabilities read back into the 2B unpacked rows (zerotune.objectives.logps.unpacked).

The proof of no contamination: a token that attended across a segment's edge would change its log-probability,
so the packed scores, losses and LoRA gradients must equal the unpacked ones (fp32, 1e-5), on a tiny Llama
(grouped-query attention) and a tiny Falcon, scored from the logits and from the chunked head; and a leak made
on purpose (one position sequence for a whole row) is caught by the same comparison."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import random_adapters
from zerotune import adapters
from zerotune.config import AdapterConfig, ObjectiveConfig
from zerotune.data.pairs import EncodedPair, collate_pairs
from zerotune.objectives import create_objective, pair_scorer
from zerotune.objectives.step import Reference
from zerotune.speed.chunked_loss import install_chunked_loss
from zerotune.tiny import build_model

VOCAB = 300
ROW_LENGTH = 32
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
OBJECTIVES = ("dpo", "orpo", "simpo")
FAMILIES = {"llama": dict(kv_heads=2), "falcon": dict(new_decoder_architecture=True, num_kv_heads=2)}


def encoded_pairs() -> list[EncodedPair]:
    """Five pairs whose ten sequences (4 to 26 tokens) share rows of 32 tokens, two or three to a row."""
    generator = torch.Generator().manual_seed(3)

    def tokens(n):
        return torch.randint(4, VOCAB, (n,), generator=generator).tolist()

    lengths = ((5, 4, 7), (9, 3, 3), (2, 8, 5), (12, 14, 6), (3, 1, 9))
    return [EncodedPair(tokens(p), tokens(c), tokens(r)) for p, c, r in lengths]


def lora_model(family: str):
    """Random nonzero adapters, so the policy differs from the reference."""
    model = build_model(family, VOCAB, hidden_size=64, layers=2, heads=4, seed=0, **FAMILIES[family])
    return random_adapters(adapters.apply_method(model, AdapterConfig(r=8, alpha=16, dropout=0.0), seed=0))


def one_step(model, objective, batch, scorer):
    """One micro-batch's loss as PreferenceStep computes it on one rank (the reference: the same model with its
    adapters multiplied by zero), backpropagated; the loss, the scores and every trainable weight's gradient."""
    model.zero_grad()
    reference = Reference(types.SimpleNamespace(unwrap=lambda m: m), scorer=scorer)
    count = scorer.count(batch)
    scores = reference.scores(model, batch, count) if objective.uses_reference else None
    policy = scorer(model, batch, count)
    result = objective(policy, scores)
    loss = sum(term / total for term, total in zip(result.terms, objective.normalisers(batch)))
    loss.backward()
    return loss.detach(), policy.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_pairs_pack_deterministically_into_segments_that_hold_each_sequence():
    pairs = encoded_pairs()
    batch = collate_pairs(pairs, pad_token_id=0, row_length=ROW_LENGTH)
    again = collate_pairs(pairs, pad_token_id=0, row_length=ROW_LENGTH)
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    rows, width = batch["packed_input_ids"].shape
    assert (rows, width) == (4, 31)  # 10 sequences of 4 to 26 tokens (122 in all), first-fit decreasing into 32
    real = batch["attention_mask"].bool()
    flat = batch["packed_input_ids"].flatten()
    # every token of every sequence sits once in the packed rows, with its own position in its sequence
    assert torch.equal(flat[batch["packed_index"][real]], batch["input_ids"][real])
    assert batch["packed_index"][real].unique().numel() == int(real.sum())
    positions = batch["packed_position_ids"].flatten()[batch["packed_index"][real]]
    assert torch.equal(positions, real.long().cumsum(-1)[real] - 1)
    assert torch.all(batch["packed_index"][~real] == rows * width)  # padding reads the spare slot


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked_head"])
def test_packed_scores_equal_the_unpacked_ones(family, chunked):
    """Per-pair sums, token counts and the chosen sequences' NLL (ORPO's, so the prompts are scored too)."""
    model = lora_model(family)
    head = install_chunked_loss(model)[0] if chunked else None
    assert (head is not None) == chunked
    scorer = pair_scorer(create_objective(ObjectiveConfig(name="orpo")), head)
    unpacked_batch = collate_pairs(encoded_pairs(), pad_token_id=0)
    packed_batch = collate_pairs(encoded_pairs(), pad_token_id=0, row_length=ROW_LENGTH)
    assert scorer.count(packed_batch) == scorer.count(unpacked_batch)
    with torch.no_grad():
        packed, unpacked = scorer(model, packed_batch), scorer(model, unpacked_batch)
    for name, value in vars(unpacked).items():
        torch.testing.assert_close(getattr(packed, name), value, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    assert torch.all(unpacked.chosen < 0) and unpacked.chosen_sequence_nll > 0


def test_a_leak_across_segments_is_caught():
    """Position ids running on through a whole row make transformers attend across the segments: the scores
    then differ, so the equalities above would fail on contamination."""
    model = lora_model("llama")
    scorer = pair_scorer(create_objective(ObjectiveConfig(name="dpo")))
    packed_batch = collate_pairs(encoded_pairs(), pad_token_id=0, row_length=ROW_LENGTH)
    leaking = dict(packed_batch, packed_position_ids=torch.arange(packed_batch["packed_input_ids"].shape[1]).expand(
        packed_batch["packed_input_ids"].shape))
    with torch.no_grad():
        clean, leaked = scorer(model, packed_batch), scorer(model, leaking)
        unpacked = scorer(model, collate_pairs(encoded_pairs(), pad_token_id=0))
    torch.testing.assert_close(clean.chosen, unpacked.chosen, **TOLERANCE)
    assert not torch.allclose(leaked.chosen, unpacked.chosen, **TOLERANCE) or \
        not torch.allclose(leaked.rejected, unpacked.rejected, **TOLERANCE)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize("family, chunked", [("llama", False), ("falcon", False), ("llama", True)],
                         ids=["llama-logits", "falcon-logits", "llama-chunked_head"])
def test_packed_losses_and_lora_gradients_equal_the_unpacked_ones(objective_name, family, chunked):
    """DPO's reference pass (adapters multiplied by zero) runs packed too. (The chunked head on Falcon: the
    scores test above.)"""
    objective = create_objective(ObjectiveConfig(name=objective_name, beta=0.3, simpo_gamma=0.4))
    model = lora_model(family)
    head = install_chunked_loss(model)[0] if chunked else None
    scorer = pair_scorer(objective, head)
    unpacked = one_step(model, objective, collate_pairs(encoded_pairs(), pad_token_id=0), scorer)
    packed = one_step(model, objective, collate_pairs(encoded_pairs(), pad_token_id=0, row_length=ROW_LENGTH), scorer)
    torch.testing.assert_close(packed[0], unpacked[0], **TOLERANCE)
    torch.testing.assert_close(packed[1].chosen, unpacked[1].chosen, **TOLERANCE)
    torch.testing.assert_close(packed[1].rejected, unpacked[1].rejected, **TOLERANCE)
    assert packed[2].keys() == unpacked[2].keys() and unpacked[2]
    for name in unpacked[2]:
        torch.testing.assert_close(packed[2][name], unpacked[2][name], **TOLERANCE, msg=lambda m: f"{name}: {m}")
    assert unpacked[0] > 0 and all(g.abs().sum() > 0 for g in unpacked[2].values())


def test_a_precomputed_reference_is_read_with_packed_pairs():
    pairs = encoded_pairs()
    for index, pair in enumerate(pairs):
        pair.reference = (-10.0 - index, -20.0 - index)
    batch = collate_pairs(pairs, pad_token_id=0, row_length=ROW_LENGTH)
    scores = Reference(None).scores(None, batch)
    assert scores.chosen.tolist() == [-10.0 - i for i in range(5)]
    assert scores.rejected.tolist() == [-20.0 - i for i in range(5)]


@pytest.mark.slow
@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_a_packed_run_gives_the_unpacked_runs_losses(objective_name, tiny_llama, pairs_file, tmp_path):
    """The CLI's run, three steps and an evaluation, packed against unpacked (DPO with --reference precomputed,
    scored once before training, packed too): the same per-step and eval losses to 1e-5."""
    import json

    from conftest import make_config
    from helpers import train

    def run(name, **overrides):
        extra = {"objective.reference": "precomputed"} if objective_name == "dpo" else {}
        config = make_config(tiny_llama, pairs_file, tmp_path / name, **{
            "objective.name": objective_name, "data.max_seq_len": 512, "data.eval_fraction": 0.25,
            "train.eval_every": 3, **extra, **overrides})
        result = train(config)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return result, [json.loads(line)["real_token_fraction"] for line in lines if "real_token_fraction" in line]

    unpacked, unpacked_fill = run("unpacked")
    packed, packed_fill = run("packed", **{"data.packing": True})
    assert len(packed_fill) == 3 and all(p > u for p, u in zip(packed_fill, unpacked_fill))  # rows were shared
    assert len(packed.losses) == 3
    torch.testing.assert_close(torch.tensor(packed.losses), torch.tensor(unpacked.losses), rtol=1e-5, atol=0)
    assert packed.eval_losses
    torch.testing.assert_close(torch.tensor(packed.eval_losses), torch.tensor(unpacked.eval_losses), rtol=1e-5, atol=0)
    # The trained adapters are not compared weight by weight: Adam's first update is lr * g / (|g| + 1e-8), so a
    # weight whose gradient is near 1e-8 turns 1e-11 of rounding (attention over rows of other shapes) into 1e-5
    # or more (measured: a few of 1,536 elements of a matrix). Steps 2 and 3 and the evaluation read the updated
    # weights, and the gradients themselves are compared to 1e-5 above.
    assert "data.packing" in (tmp_path / "packed" / "resolved.yaml").read_text()
