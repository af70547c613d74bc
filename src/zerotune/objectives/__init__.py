"""Training objectives: what a step's loss is.

SFT (next-token cross-entropy on the response tokens) is zerotune.step's own path. The preference objectives
score pairs (zerotune.data.pairs): one forward over the chosen and rejected sequences of a micro-batch gives
each response's summed log-probability (``logps.PairScores``); the objective turns those, and the reference
model's where it needs them, into loss terms and rewards. A term is a sum over the micro-batch, divided by its
count over the whole global batch (every micro-batch on every rank), so the loss does not depend on how the
batch is split, as for SFT. Adding an objective (IPO, KTO, ...) is one small module here.
    dpo.py      DPO: sigmoid loss of the reward margin against a reference, with label smoothing
    orpo.py     ORPO: NLL of the chosen sequence plus an odds-ratio term; no reference
    simpo.py    SimPO: length-normalised rewards with a target margin; no reference
    logps.py    per-sequence log-probabilities of a pair batch
    step.py     the optimizer step, the reference pass and the evaluation for pairs
"""

from __future__ import annotations

from zerotune.config import ObjectiveConfig


def create_objective(config: ObjectiveConfig):
    """The preference objective ``config`` names, or None for SFT."""
    if config.name == "dpo":
        from zerotune.objectives.dpo import DPO

        return DPO(config.beta, config.label_smoothing)
    if config.name == "orpo":
        from zerotune.objectives.orpo import ORPO

        return ORPO(config.beta)
    if config.name == "simpo":
        from zerotune.objectives.simpo import SimPO

        return SimPO(config.beta, config.simpo_gamma, config.label_smoothing)
    return None


def pair_scorer(objective, head=None):
    """The PairScorer a run scores pairs with: per-token log-probabilities from ``head`` (a ChunkedLossHead that
    speed.install put on the model where zerotune.resolve turned model.chunked_loss on), else from the logits."""
    from zerotune.objectives.logps import HeadTokenLogps, PairScorer, logits_token_logps

    per_token = HeadTokenLogps(head) if head is not None else logits_token_logps
    return PairScorer(per_token, whole_chosen=objective.needs_chosen_sequence_nll)
