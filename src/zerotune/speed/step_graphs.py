"""A training step replayed as one CUDA graph (``train.cuda_graph``): the host launches one graph instead of
thousands of kernels, so a step whose host work outlasts its GPU work (QLoRA or LoRA at small micro-batches)
runs at the GPU's pace.

The step (every micro-batch's forward and backward, clipping, the optimizer update, zeroing the gradients) is
a function of its batches and the global label-token count. Per batch signature (keys, shapes, and whether each
micro-batch is plain causal), the first ``WARMUP`` steps run op by op on a side stream (compilation, lazy
initialisation), the next is captured and every later one replays: the new batches are copied into the
captured inputs first. At most ``LIMIT`` signatures get a graph (they share one memory pool); other shapes run
op by op. Whatever must change between replays lives in device tensors the graph reads: the learning rate (a
tensor the scheduler fills, outside the graph), the batch and the token count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch



@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    batches: list[dict[str, torch.Tensor]]
    global_tokens: torch.Tensor
    outcome: torch.Tensor


def graph_learning_rate(lr: float, device: torch.device, graphs: bool):
    """The optimizer's learning rate: for replayed steps a device tensor, which the scheduler fills in place
    outside the graph (a number would be baked into the captured update)."""
    return torch.tensor(lr, device=device) if graphs else lr


def step_plain(flags: list[bool]) -> list[bool]:
    """One plain-causal flag for all of a step's micro-batches: plain only if every one is. A plain batch runs
    exactly through the masked path too, and per-micro-batch flags would make up to 2**grad_accum signatures
    of one shape (packed rows that happen to hold one example each), more than ``StepGraphs.LIMIT`` graphs;
    this way a shape has at most two."""
    return [all(flags)] * len(flags)


def signature(batches: list[dict[str, torch.Tensor]], plain: list[bool]) -> tuple:
    return tuple((tuple((key, tuple(value.shape)) for key, value in sorted(batch.items())), flag)
                 for batch, flag in zip(batches, plain))


class StepGraphs:
    WARMUP = 2
    LIMIT = 2

    def __init__(self, body, note=print):
        """``body(batches, global_tokens, plain) -> outcome``: the whole step on device tensors (``plain``: per
        micro-batch, whether it is plain causal); it must not wait for the GPU (no host reads of device values)."""
        self.body = body
        self.note = note
        self.seen: Counter = Counter()
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None
        self.side = torch.cuda.Stream()

    def __call__(self, batches: list[dict[str, torch.Tensor]], global_tokens: torch.Tensor,
                 plain: list[bool]) -> torch.Tensor:
        key = signature(batches, plain)
        entry = self.captured.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.seen[key] <= self.WARMUP:
                return self._on_side_stream(batches, global_tokens, plain)
            if len(self.captured) >= self.LIMIT:
                return self.body(batches, global_tokens, plain)
            entry = self._capture(batches, global_tokens, plain, key)
        else:
            for static, new in zip(entry.batches, batches):
                for name, tensor in new.items():
                    static[name].copy_(tensor, non_blocking=True)
            entry.global_tokens.copy_(global_tokens, non_blocking=True)
        entry.graph.replay()
        return entry.outcome.clone()

    def _on_side_stream(self, batches, global_tokens, plain) -> torch.Tensor:
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            outcome = self.body(batches, global_tokens, plain)
        current.wait_stream(self.side)
        return outcome

    def _capture(self, batches, global_tokens, plain, key) -> _Captured:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outcome = self.body(batches, global_tokens, plain)
        self.pool = self.pool or graph.pool()
        # The warm-up steps' blocks, cached in the ordinary pool, are not what the replays use: give them back,
        # so that evaluation and saving between replays do not need the step's memory twice.
        torch.cuda.empty_cache()
        entry = _Captured(graph, batches, global_tokens, outcome)
        self.captured[key] = entry
        self.note(f"train.cuda_graph: captured the step for batches of shape "
                  f"{[tuple(b['input_ids'].shape) for b in batches]} ({len(self.captured)} of at most {self.LIMIT})")
        return entry
