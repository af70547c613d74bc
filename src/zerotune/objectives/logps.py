"""Per-sequence log-probabilities of a pair batch (zerotune.data.pairs.collate_pairs: B chosen rows, then B
rejected rows), from one forward of the model over all 2B rows."""

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


def score_pairs(model, batch: dict[str, torch.Tensor]) -> PairScores:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    per_token = token_logps(logits[:, :-1], targets)
    response = (batch["labels"][:, 1:] != IGNORE_INDEX).to(per_token.dtype)
    sums, counts = (per_token * response).sum(-1), response.sum(-1)
    pairs = batch["input_ids"].shape[0] // 2
    in_chosen_sequence = batch["attention_mask"][:pairs, 1:].to(per_token.dtype)
    return PairScores(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:],
                      -(per_token[:pairs] * in_chosen_sequence).sum())


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
