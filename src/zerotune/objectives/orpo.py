"""ORPO (Hong et al. 2024): no reference model; the NLL of the chosen sequence plus beta (the paper's lambda)
times -log sigmoid of the log odds ratio of the chosen over the rejected response, odds taken from each
response's mean token log-probability. As in the paper's code and TRL's ORPOTrainer (the reference,
tests/test_preference_trl.py), the NLL term covers the whole chosen sequence, prompt included, averaged over
its tokens; the odds-ratio term covers the response tokens only."""

from __future__ import annotations

import torch.nn.functional as F

from zerotune.objectives.logps import PairLoss, PairScores, chosen_sequence_tokens, log1mexp


class ORPO:
    name = "orpo"
    uses_reference = False
    needs_chosen_sequence_nll = True  # whether PairScores.chosen_sequence_nll is read (scores the prompts)
    term_names = ("odds_ratio_loss", "nll_loss")

    def __init__(self, beta: float):
        self.beta = beta

    def normalisers(self, batch) -> list[int]:
        return [batch["input_ids"].shape[0] // 2, chosen_sequence_tokens(batch)]  # pairs, NLL tokens

    def __call__(self, policy: PairScores, reference: None = None) -> PairLoss:
        chosen = policy.chosen / policy.chosen_tokens  # mean log-probability per response token
        rejected = policy.rejected / policy.rejected_tokens
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        odds_ratio_loss = -self.beta * F.logsigmoid(log_odds)
        return PairLoss([odds_ratio_loss.sum(), policy.chosen_sequence_nll], self.beta * chosen.detach(),
                        self.beta * rejected.detach())
