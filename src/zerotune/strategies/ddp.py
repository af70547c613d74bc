"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced (averaged)."""

from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from zerotune.strategies.collectives import CollectivesMixin
from zerotune.strategies.base import Strategy


class DDPStrategy(CollectivesMixin, Strategy):
    name = "ddp"

    def wrap(self, model, build_optimizer, build_scheduler, total_steps):
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers not broadcast before every forward: a causal LM's (rotary frequencies) are the same on every
        # rank, and fused projections hold the frozen weights in buffers (adapter.fused_projections).
        wrapped = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        self.optimizer = build_optimizer([p for p in wrapped.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(self.optimizer)
        return wrapped

    @contextlib.contextmanager
    def accumulating(self, model, sync):
        # Skipping the all-reduce on all but the last micro-batch saves (grad_accum - 1) gradient exchanges.
        if sync:
            yield
        else:
            with model.no_sync():
                yield

    def unwrap(self, model):
        return model.module
