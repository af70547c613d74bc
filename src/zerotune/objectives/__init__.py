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


def speed_settings(config):
    """The config speed.install reads: a preference objective leaves out the chunked loss, which returns a loss
    sum, not the per-sequence log-probabilities pairs need (zerotune.resolve decides the other features)."""
    if config.objective.name == "sft":
        return config
    from dataclasses import replace

    return replace(config, model=replace(config.model, chunked_loss=False))
