"""Per-sequence log-probabilities of a pair batch (zerotune.data.pairs.collate_pairs: B chosen rows, then B
rejected rows), from one forward of the model over all 2B rows, or over those sequences packed into fewer rows
(--packing: collate_pairs' row_length), read back into the 2B rows before they are summed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zerotune.data.encode import IGNORE_INDEX


@dataclass
class PairScores:
    """What a forward gives the objectives; every tensor has one value per pair (B,) but the last."""

    chosen: torch.Tensor  # summed log-probability of the chosen response's tokens
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # response tokens (float), for length-normalised rewards
    rejected_tokens: torch.Tensor
    chosen_sequence_nll: torch.Tensor  # scalar: NLL summed over every chosen sequence token after the first (ORPO)

    def detach(self) -> "PairScores":
        return PairScores(*(value.detach() for value in vars(self).values()))


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32, without a (rows, length, vocab) log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def scored_targets(batch: dict[str, torch.Tensor], whole_chosen: bool = True) -> torch.Tensor:
    """[rows, length]: the next token at each position whose log-probability a score needs, -100 elsewhere (and
    at the last position): the response tokens, and with ``whole_chosen`` every chosen sequence token after the
    first (ORPO's NLL term). Cheap on the host or the device."""
    next_tokens = batch["input_ids"][:, 1:]
    wanted = batch["labels"][:, 1:] != IGNORE_INDEX
    if whole_chosen:
        pairs = batch["input_ids"].shape[0] // 2
        wanted[:pairs] |= batch["attention_mask"][:pairs, 1:].bool()
    targets = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    targets[:, :-1] = next_tokens.masked_fill(~wanted, IGNORE_INDEX)
    return targets


def logits_token_logps(model, inputs: dict, targets: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """[rows, length] log-probabilities of ``targets`` (scored_targets) from the model's full logits; 0 at -100."""
    logits = model(**inputs).logits
    return token_logps(logits, targets.clamp(min=0)) * (targets != IGNORE_INDEX)


class HeadTokenLogps:
    """logits_token_logps's values from a zerotune.speed.chunked_loss.ChunkedLossHead: the output head computes
    only the wanted positions' log-probabilities, in chunks, so no [rows, length, vocab] logits exist."""

    def __init__(self, head):
        self.head = head

    def __call__(self, model, inputs: dict, targets: torch.Tensor, count: int | None = None) -> torch.Tensor:
        with self.head.scoring(targets, count):
            return model(**inputs).logits


def score_pairs(model, batch: dict[str, torch.Tensor], per_token=logits_token_logps, whole_chosen: bool = True,
                count: int | None = None) -> PairScores:
    """One forward over the pair batch. ``per_token``: logits_token_logps or a HeadTokenLogps; ``whole_chosen``:
    also score the chosen prompts (for chosen_sequence_nll; else it is 0); ``count``: how many positions are
    scored (scored_targets' non -100 count, known on the host), which saves the chunked head a host-GPU sync."""
    targets = scored_targets(batch, whole_chosen)
    if "packed_index" in batch:  # --packing: one forward over the packed rows, read back into the 2B rows
        index = batch["packed_index"]
        inputs = dict(input_ids=batch["packed_input_ids"], position_ids=batch["packed_position_ids"], use_cache=False)
        per_token = unpacked(per_token(model, inputs, packed(targets, index, inputs["input_ids"].shape), count), index)
    else:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        per_token = per_token(model, inputs, targets, count)
    per_token = per_token[:, :-1]
    response = (batch["labels"][:, 1:] != IGNORE_INDEX).to(per_token.dtype)
    sums, counts = (per_token * response).sum(-1), response.sum(-1)
    pairs = batch["input_ids"].shape[0] // 2
    in_chosen_sequence = batch["attention_mask"][:pairs, 1:].to(per_token.dtype)
    nll = -(per_token[:pairs] * in_chosen_sequence).sum() if whole_chosen else per_token.new_zeros(())
    return PairScores(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:], nll)


def packed(targets: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """scored_targets of the 2B rows placed where their tokens sit in the packed rows (zerotune.data.pairs.
    pack_sequences), -100 elsewhere. A sequence's last token has no target, so none crosses into the next."""
    flat = targets.new_full((shape[0] * shape[1] + 1,), IGNORE_INDEX)
    flat[index.flatten()] = targets.flatten()  # every padding token writes -100 to the spare slot at the end
    return flat[:-1].view(shape)


def unpacked(per_token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[2B, longest sequence]: the packed rows' per-token log-probabilities in the unpacked layout, 0 at padding,
    so the per-sequence sums below add the same values in the same order as an unpacked forward's."""
    flat = torch.cat([per_token.flatten(), per_token.new_zeros(1)])
    return flat[index]


@dataclass(frozen=True)
class PairScorer:
    """score_pairs as a run calls it, chosen once: the per-token log-probabilities from the chunked head or the
    logits (zerotune.resolve decides model.chunked_loss), and whether the objective reads the chosen sequences'
    NLL (ORPO) or only the responses."""

    per_token: object = logits_token_logps
    whole_chosen: bool = True

    def __call__(self, model, batch: dict[str, torch.Tensor], count: int | None = None) -> PairScores:
        return score_pairs(model, batch, self.per_token, self.whole_chosen, count)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The positions one forward scores, counted on the host batch."""
        return int((scored_targets(batch, self.whole_chosen) != IGNORE_INDEX).sum())


def chosen_sequence_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens ORPO's NLL term averages over (on the host): every chosen sequence's tokens after the first."""
    pairs = batch["input_ids"].shape[0] // 2
    return int(batch["attention_mask"][:pairs, 1:].sum())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with probability ``label_smoothing`` that the pair's label is flipped (cDPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@dataclass
class PairLoss:
    """An objective's answer for one micro-batch. ``terms``: sums over its pairs (or tokens), each divided by
    the global count of the matching ``normalisers`` entry; the rewards are per pair, without gradient."""

    terms: list[torch.Tensor]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
