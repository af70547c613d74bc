"""The optimizer step, the reference pass and the evaluation for preference pairs.

A micro-batch of B pairs is one forward over 2B rows (chosen, then rejected), or with --packing over those 2B
sequences packed into rows of data.max_seq_len (the same pairs per micro-batch, so the same losses). The
reference log-probabilities come from the same model with its LoRA layers' contribution multiplied by zero
(adapters_zeroed; no second copy of the weights), or, for full fine-tuning, from a frozen copy of the base taken
before training. Loss normalisation:
each objective term is a sum over the micro-batch divided by its count over the global batch (all micro-batches
on all ranks), reduced on the host before the forward as SFT's label-token count is (zerotune.step); each
micro-batch backpropagates ``loss * world_size`` and the engines average over ranks.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from zerotune.data.batches import even_batches
from zerotune.data.pairs import collate_pairs
from zerotune.errors import ConfigError
from zerotune.objectives.logps import PairLoss, PairScorer, PairScores
from zerotune.step import count_label_tokens
from zerotune.step_io import HostCopy, LaunchedStep, WorkDone, host_values, to_device

# per-pair metrics after the objective's terms, each a mean over the global batch's pairs
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


def packed_row_length(config) -> int | None:
    """With --packing, the length of the rows each batch's sequences are packed into (data.max_seq_len)."""
    return config.data.max_seq_len if config.data.packing else None


def frozen_reference(objective, model: torch.nn.Module, method: str, strategy_name: str, reference: str = "live"):
    """For full fine-tuning under a reference objective scored live: a frozen copy of the base ``model`` (before
    any update), else None (LoRA and QLoRA multiply their adapters by zero; precomputed values need no model)."""
    if objective is None or not objective.uses_reference or method != "full" or reference == "precomputed":
        return None
    if strategy_name not in ("single", "ddp"):
        raise ConfigError(f"objective.name {objective.name} with --method full keeps a frozen reference copy, which "
                          f"the {strategy_name} engine does not shard; use --method lora, or --strategy ddp")
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def adapters_zeroed(model: torch.nn.Module):
    """Every LoRA layer's scaling set to 0 while inside: the adapters' contribution is multiplied by zero rather
    than skipped, so the reference pass runs the policy's own kernels (fused stacked matmuls and compiled graphs
    included) and, while LoRA-B is zero, gives the policy's log-probs bit for bit in bf16 too. PEFT's
    disable_adapter skips them, which runs matmuls of other shapes whose bf16 rounding differs: on an H100 a 7B
    DPO's first loss read 0.776 instead of ln 2. The random-number state is restored on the way out, so LoRA
    dropout in this pass draws nothing from the policy's stream."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        for layer in layers:
            layer.scaling.update(dict.fromkeys(layer.scaling, 0.0))
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


class Reference:
    """The reference model's scores of a pair batch, without gradient: ``scorer`` scores the policy model with
    its adapters off, ``frozen_scorer`` the frozen copy (each with its own output head's chunked scoring)."""

    def __init__(self, strategy, frozen: torch.nn.Module | None = None, scorer: PairScorer = PairScorer(),
                 frozen_scorer: PairScorer | None = None):
        self.strategy, self.frozen, self.scorer = strategy, frozen, scorer
        self.frozen_scorer = frozen_scorer or scorer

    def scores(self, model, batch, count: int | None = None):
        if "reference_logps" in batch:  # precomputed before training (attach_reference)
            chosen, rejected = batch["reference_logps"].chunk(2)
            unused = torch.zeros_like(chosen)
            return PairScores(chosen, rejected, unused, unused, unused.sum())
        with torch.no_grad():
            if self.frozen is not None:
                return self.frozen_scorer(self.frozen, batch, count)
            with adapters_zeroed(self.strategy.unwrap(model)):
                return self.scorer(model, batch, count)


def pair_sums(objective, result: PairLoss, policy) -> list[torch.Tensor]:
    """The micro-batch's metric sums, in PAIR_METRICS order (divided by the global pair count later)."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return [chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).float().sum(),
            policy.chosen.detach().sum(), policy.rejected.detach().sum()]


def metric_names(objective) -> tuple[str, ...]:
    terms = objective.term_names if len(objective.term_names) > 1 else ()
    return ("loss", *terms, *PAIR_METRICS)


class PreferenceStep:
    """zerotune.step.TrainStep's counterpart for pairs: launches one optimizer step on a rank's micro-batches of
    pairs and returns a LaunchedStep whose outcome holds the step's mean loss and whose metrics hold the
    objective's terms and the rewards."""

    def __init__(self, model, strategy, objective, reference: Reference, *, precision, pad_token_id: int,
                 scorer: PairScorer = PairScorer(), row_length: int | None = None):
        self.model, self.strategy, self.objective, self.reference = model, strategy, objective, reference
        self.precision, self.pad_token_id, self.scorer = precision, pad_token_id, scorer
        self.row_length = row_length  # --packing: each micro-batch's sequences packed into rows of this length
        self.metric_names = metric_names(objective)

    def __call__(self, step: int, examples: list[list], votes) -> LaunchedStep:
        strategy = self.strategy
        batches = [collate_pairs(micro, self.pad_token_id, self.row_length) for micro in examples]
        normalisers = [sum(counts) for counts in zip(*(self.objective.normalisers(b) for b in batches))]
        scored = [self.scorer.count(b) for b in batches]  # on the host: the chunked head then needs no sync
        vote_values = votes()
        # One all-reduce before the forward, as for SFT: response tokens, input tokens, slots and the votes (the
        # loop reads those four), then the global counts the objective's terms are divided by.
        info = strategy.all_reduce_sum(host_values(strategy.device, [
            sum(count_label_tokens(b) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches),
            sum(b.get("packed_input_ids", b["input_ids"]).numel() for b in batches), *vote_values, *normalisers]))
        info_copy = HostCopy(info)
        totals = info[3 + len(vote_values):].float()
        device_batches = [to_device(batch, strategy.device) for batch in batches]
        lr = strategy.current_lr()
        outcome, metrics = self._compute(device_batches, totals, scored)
        strategy.advance_schedule()
        return LaunchedStep(step, lr, info_copy, HostCopy(outcome), WorkDone(strategy.device), HostCopy(metrics),
                            self.metric_names)

    def _compute(self, device_batches, totals: torch.Tensor, scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[mean loss, grad norm, applied] and [each term, the pair metrics] of one optimizer step."""
        model, strategy, objective = self.model, self.strategy, self.objective
        sums = torch.zeros(len(objective.term_names) + len(PAIR_METRICS), device=strategy.device)
        for index, batch in enumerate(device_batches):
            with strategy.accumulating(model, sync=index == len(device_batches) - 1):
                with self.precision():
                    reference = self.reference.scores(model, batch, scored[index]) if objective.uses_reference \
                        else None
                    policy = self.scorer(model, batch, scored[index])
                    result = objective(policy, reference)
                    terms = torch.stack([term / total.clamp(min=1) for term, total in zip(result.terms, totals)])
                strategy.backward(terms.sum() * strategy.world_size)
            sums += torch.stack([*terms.detach(), *pair_sums(objective, result, policy)])
        sums = strategy.all_reduce_sum(sums)
        term_count = len(objective.term_names)
        loss_total = sums[:term_count].sum()
        grad_norm, applied = strategy.optimizer_step(model, loss_total)
        outcome = torch.stack([loss_total, grad_norm.to(loss_total.device).float(),
                               applied.to(loss_total.device).float()])
        metrics = torch.cat([loss_total[None], sums[:term_count] if term_count > 1 else sums[:0],
                             sums[term_count:] / totals[0].clamp(min=1)])
        return outcome, metrics


@torch.no_grad()
def evaluate_pairs(model, strategy, objective, reference: Reference, examples, batch_size: int, pad_token_id: int,
                   precision=None, scorer: PairScorer = PairScorer(), row_length: int | None = None
                   ) -> dict[str, float]:
    """The objective's loss and pair metrics over every eval pair, across all ranks, as ``eval_`` metrics;
    ``row_length``: each batch's sequences packed (collate_pairs), which changes no value."""
    model.eval()
    term_count = len(objective.term_names)
    # term sums, their counts, then the pair metric sums
    totals = torch.zeros(2 * term_count + len(PAIR_METRICS), device=strategy.device)
    for indices, keep in even_batches(len(examples), batch_size, strategy.rank, strategy.world_size):
        batch = collate_pairs([examples[i] for i in indices], pad_token_id, row_length)
        counts = objective.normalisers(batch)
        batch = to_device(batch, strategy.device)
        with (precision or contextlib.nullcontext)():
            scores = reference.scores(model, batch) if objective.uses_reference else None
            policy = scorer(model, batch)
            result = objective(policy, scores)
        if keep:
            totals += torch.stack([*result.terms, *torch.tensor(counts, device=strategy.device, dtype=totals.dtype),
                                   *pair_sums(objective, result, policy)])
    totals = strategy.all_reduce_sum(totals).tolist()
    model.train()
    terms = [value / max(count, 1) for value, count in zip(totals[:term_count], totals[term_count:2 * term_count])]
    names = metric_names(objective)
    values = [sum(terms), *(terms if term_count > 1 else []),
              *(value / max(totals[term_count], 1) for value in totals[2 * term_count:])]
    return {f"eval_{name}": value for name, value in zip(names, values)}


REFERENCE_FILE = "reference_logps.safetensors"


def attach_reference(model, strategy, data, batch_size: int, pad_token_id: int, precision, output_dir, is_lora: bool,
                     note=print, scorer: PairScorer = PairScorer(), row_length: int | None = None) -> None:
    """--reference precomputed: every train and eval pair's reference log-probs, attached to the pairs. Scored
    once at a fresh start by the model as loaded (LoRA switched off; full fine-tuning: before any update), each
    worker a share (packed with ``row_length``), and kept in the run directory, which a resumed run reads back
    (its model has trained)."""
    from safetensors.torch import load_file, save_file

    path = Path(output_dir) / REFERENCE_FILE
    splits = {"train": data.train, "eval": data.eval}
    if path.is_file():
        values = load_file(str(path))
        note(f"reference log-probs read from {path}")
    else:
        values = {name: _score_all(model, strategy, pairs, batch_size, pad_token_id, precision, is_lora, scorer,
                                   row_length) for name, pairs in splits.items() if pairs}
        if strategy.is_main:
            save_file(values, str(path))
        strategy.barrier()
        note(f"reference log-probs of {sum(len(p) for p in splits.values())} pairs computed once, kept in {path}")
    for name, pairs in splits.items():
        if pairs and (name not in values or len(values[name]) != len(pairs)):
            raise ConfigError(f"{path}: holds reference log-probs for other data; delete it or start a new "
                              "--output-dir")
        for pair, (chosen, rejected) in zip(pairs, values.get(name, torch.zeros(0, 2)).tolist()):
            pair.reference = (chosen, rejected)


@torch.no_grad()
def _score_all(model, strategy, pairs, batch_size: int, pad_token_id: int, precision, is_lora: bool,
               scorer: PairScorer, row_length: int | None) -> torch.Tensor:
    """(len(pairs), 2) reference log-probs, each worker scoring a share. Every worker runs the same number of
    forwards (even_batches)."""
    mine = {}
    model.eval()
    off = adapters_zeroed(strategy.unwrap(model)) if is_lora else contextlib.nullcontext()
    with off:
        for indices, keep in even_batches(len(pairs), batch_size, strategy.rank, strategy.world_size):
            batch = to_device(collate_pairs([pairs[i] for i in indices], pad_token_id, row_length), strategy.device)
            with (precision or contextlib.nullcontext)():
                scores = scorer(model, batch)
            if keep:
                mine.update(zip(indices, zip(scores.chosen.tolist(), scores.rejected.tolist())))
    model.train()
    values = torch.zeros(len(pairs), 2)
    for shard in strategy.all_gather_object(mine):
        for index, pair_values in shard.items():
            values[index] = torch.tensor(pair_values)
    return values
