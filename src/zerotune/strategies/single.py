"""One process, one device: no wrapping, no communication."""

from __future__ import annotations

from zerotune.strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    name = "single"

    def wrap(self, model, build_optimizer, build_scheduler, total_steps):
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(self.optimizer)
        return model
