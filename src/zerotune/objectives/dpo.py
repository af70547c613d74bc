"""DPO (Rafailov et al. 2023): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), the log-ratios
taken against the reference model; label smoothing gives conservative DPO. TRL's DPOTrainer (loss_type
sigmoid) and its label-smoothed sigmoid are the reference (tests/test_preference_trl.py)."""

from __future__ import annotations

from zerotune.objectives.logps import PairLoss, PairScores, sigmoid_loss


class DPO:
    name = "dpo"
    uses_reference = True
    needs_chosen_sequence_nll = False  # whether PairScores.chosen_sequence_nll is read (scores the prompts)
    term_names = ("loss",)

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        self.beta, self.label_smoothing = beta, label_smoothing

    def normalisers(self, batch) -> list[int]:
        return [batch["input_ids"].shape[0] // 2]  # pairs

    def __call__(self, policy: PairScores, reference: PairScores) -> PairLoss:
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        losses = sigmoid_loss(self.beta * (chosen_ratio - rejected_ratio), self.label_smoothing)
        return PairLoss([losses.sum()], self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())
