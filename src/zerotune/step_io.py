"""Moving a step's data between host and device without stalling the GPU: batches and host counts go over
from pinned memory, results come back through pinned buffers and events, and steps are timed on the device's
own timeline. Nothing here knows about engines or models."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def without_full_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop an all-ones attention mask, checked on the host: transformers would otherwise test it on the GPU
    (``mask.all()``) in every forward, a sync that drains the GPU's queue."""
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        return {key: value for key, value in batch.items() if key != "attention_mask"}
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copies that do not wait for the GPU: from pinned memory, a host-to-device copy is queued like a kernel
    (from pageable memory it would stall the host until the GPU's queue drains)."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def host_values(device: torch.device, values: list[float]) -> torch.Tensor:
    """Host numbers as one float64 tensor on ``device`` (exact for counts up to 2**53), queued without a sync."""
    return to_device({"values": torch.tensor([float(v) for v in values], dtype=torch.float64)}, device)["values"]


class HostCopy:
    """A small device tensor on its way to the host: the copy is queued behind the work that produces it, and
    ``values()`` waits for that work alone (an event), not for everything queued after it."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.clone()
        self._values: list[float] | None = None

    def values(self) -> list[float]:
        if self._values is None:
            if self.event is not None:
                self.event.synchronize()
            self._values = [float(v) for v in self.host.tolist()]
        return self._values


class WorkDone:
    """The moment the work queued so far is done: a timing event on a GPU, the host clock on a CPU (where the
    work is done when the call returns). Steps are timed end to end on the device's own timeline, which stays
    right whether the GPU or the host is the bottleneck, and for the last step too."""

    def __init__(self, device: torch.device):
        self.event, self.time = None, time.perf_counter()
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()

    def seconds_since(self, earlier: "WorkDone") -> float:
        if self.event is None or earlier.event is None:
            return self.time - earlier.time
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1000


@dataclass
class LaunchedStep:
    """A step whose work is queued: its reduced host counts and signals, its loss sum, grad norm and whether
    its update was applied on their way back, and the moment its work ends. A preference step's outcome holds
    its mean loss (an SFT step's the loss sum over label tokens), and ``metrics`` its objective's named values."""

    step: int
    lr: float
    info: HostCopy
    outcome: HostCopy
    done: WorkDone
    metrics: HostCopy | None = None
    metric_names: tuple[str, ...] = ()

    def named_metrics(self) -> dict[str, float]:
        return dict(zip(self.metric_names, self.metrics.values())) if self.metrics is not None else {}
