"""One optimizer step: the loss, the micro-batches' forwards and backwards, the update.

Loss normalisation: each optimizer step's loss is the sum of per-token cross-entropy over every label token
of the global batch (all micro-batches on all ranks), divided by the number of those tokens. Each micro-batch
backpropagates ``loss_sum * world_size / global_tokens``; the engines average gradients over ranks, which
turns that back into the global token mean. So 1x8, 2x4 and 4x2 splits give the same update.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from zerotune.config import RunConfig
from zerotune.data.batches import collate
from zerotune.data.encode import IGNORE_INDEX
from zerotune.model import compute_precision
from zerotune.speed.chunked_loss import ALL_ROWS
from zerotune.speed.plain_causal import is_plain_causal, plain_causal
from zerotune.speed.step_graphs import StepGraphs, step_plain
from zerotune.step_io import HostCopy, LaunchedStep, WorkDone, host_values, to_device, without_full_mask


def token_loss_sum(model, batch: dict[str, torch.Tensor], head=None,
                   label_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label tokens, and the number of those tokens. Packed batches go in
    with position ids and no attention mask (and never a KV cache), so attention stays inside each example.
    With ``head`` (a zerotune.speed.chunked_loss.ChunkedLossHead) the output head returns the loss sum itself,
    chunked; ``label_count`` (count_label_tokens of the batch, taken on the host) lets it skip a host-GPU sync."""
    if "position_ids" in batch:
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        # A batch without padding may come without its mask (see without_full_mask): plain causal attention.
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    labels = batch["labels"][:, 1:]
    tokens = (labels != IGNORE_INDEX).sum()
    if head is not None:
        with head.computing(batch["labels"], label_count):
            return model(**inputs).logits, tokens
    logits = model(**inputs).logits[:, :-1].float()
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, tokens


def learning_rate_factor(config: RunConfig, total_steps: int):
    """Linear warmup, then cosine, linear or constant; a multiplier of the peak lr per step."""
    warmup = config.train.warmup_steps
    schedule = config.train.schedule

    def factor(step: int) -> float:
        if step < warmup:  # step / warmup, as transformers and DeepSpeed's WarmupLR do
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def forward_precision(strategy, config: RunConfig, model, graphs: bool = False):
    """The context each forward runs in: none where the engine keeps its own precision (DeepSpeed turns an outer
    autocast off around its model, and warns), else compute_precision's (autocast when the weights are 16-bit)."""
    if strategy.own_precision:
        return contextlib.nullcontext
    return compute_precision(config.model, model, strategy.device, cache=not graphs)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class TrainStep:
    """Launches one optimizer step on a rank's micro-batches and returns it as a LaunchedStep, whose numbers
    the host reads later: nothing here waits for the GPU. With ``graphs`` the step replays as one CUDA graph
    (zerotune.speed.step_graphs); the learning-rate schedule then advances outside the graph."""

    def __init__(self, model, strategy, *, loss_head, precision, graphs: bool, pad_token_id: int,
                 pad_to: int | None, note=print):
        self.model, self.strategy, self.loss_head, self.precision = model, strategy, loss_head, precision
        self.pad_token_id, self.pad_to = pad_token_id, pad_to
        self.graphs = StepGraphs(lambda batches, tokens, plain: self._compute(batches, tokens, None, plain),
                                 note=note) if graphs else None

    def __call__(self, step: int, examples: list[list], votes) -> LaunchedStep:
        """``examples``: this rank's micro-batches; ``votes()``: flags every rank sums (a stop signal, a due
        save), asked for once the batches are built, as late as possible before the all-reduce."""
        strategy = self.strategy
        batches = [collate(micro, self.pad_token_id, self.pad_to) for micro in examples]
        counts = [count_label_tokens(b) for b in batches]  # on the host, before the batches move
        # One all-reduce, before the forward, carries the label-token count the loss is divided by, the input
        # tokens and slots for the metrics, and the votes. Everything in it is known on the host already.
        info = strategy.all_reduce_sum(host_values(strategy.device, [
            sum(counts), sum(int(b["attention_mask"].sum()) for b in batches),
            sum(b["input_ids"].numel() for b in batches), *votes()]))
        # Its copy back is queued now, ahead of this step's work: queued after it, reading the votes would
        # wait for the whole step, and the GPU would idle while the host batches the next one.
        info_copy = HostCopy(info)
        batches = [without_full_mask(batch) for batch in batches]
        # one plain-causal flag per step (step_graphs.step_plain); the hint exists with graphs only
        plain = step_plain([is_plain_causal(b) for b in batches]) if self.graphs else [False] * len(batches)
        device_batches = [to_device(batch, strategy.device) for batch in batches]
        lr = strategy.current_lr()
        if self.graphs:
            outcome = self.graphs(device_batches, info[0].float(), plain)
        else:
            outcome = self._compute(device_batches, info[0].float(), counts, plain)
        strategy.advance_schedule()  # outside a captured graph: it fills the learning rate the next replay reads
        return LaunchedStep(step, lr, info_copy, HostCopy(outcome), WorkDone(strategy.device))

    def _compute(self, device_batches, global_tokens, counts=None, plain=None) -> torch.Tensor:
        """One optimizer step on batches already on the device: [loss sum, grad norm, applied]. With CUDA
        graphs (counts None) nothing here reads a device value on the host, and the loss runs over every row."""
        model, strategy = self.model, self.strategy
        step_loss_sum = torch.zeros((), device=strategy.device)
        for index, batch in enumerate(device_batches):
            with strategy.accumulating(model, sync=index == len(device_batches) - 1):
                with self.precision(), plain_causal(plain[index]):
                    loss_sum, _ = token_loss_sum(model, batch, self.loss_head,
                                                 ALL_ROWS if counts is None else counts[index])
                strategy.backward(loss_sum * strategy.world_size / global_tokens.clamp(min=1))
            step_loss_sum += loss_sum.detach()
        loss_total = strategy.all_reduce_sum(step_loss_sum)
        grad_norm, applied = strategy.optimizer_step(model, loss_total)
        return torch.stack([loss_total.float(), grad_norm.to(loss_total.device).float(),
                            applied.to(loss_total.device).float()])
