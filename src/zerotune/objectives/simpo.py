"""SimPO (Meng et al. 2024): no reference model; the reward is beta times the mean log-probability of a
response's tokens, and the loss -log sigmoid(chosen reward - rejected reward - gamma). TRL's CPOTrainer with
loss_type simpo and cpo_alpha 0 is the reference (tests/test_preference_trl.py)."""

from __future__ import annotations

from zerotune.objectives.logps import PairLoss, PairScores, sigmoid_loss


class SimPO:
    name = "simpo"
    uses_reference = False
    needs_chosen_sequence_nll = False  # whether PairScores.chosen_sequence_nll is read (scores the prompts)
    term_names = ("loss",)

    def __init__(self, beta: float, gamma: float, label_smoothing: float = 0.0):
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def normalisers(self, batch) -> list[int]:
        return [batch["input_ids"].shape[0] // 2]  # pairs

    def __call__(self, policy: PairScores, reference: None = None) -> PairLoss:
        chosen = self.beta * policy.chosen / policy.chosen_tokens
        rejected = self.beta * policy.rejected / policy.rejected_tokens
        losses = sigmoid_loss(chosen - rejected - self.gamma, self.label_smoothing)
        return PairLoss([losses.sum()], chosen.detach(), rejected.detach())
