"""Engines behind one interface: single device, DDP, FSDP2, DeepSpeed ZeRO."""

from __future__ import annotations

from zerotune.strategies.base import Strategy


def create_strategy(name: str, config, device, rank: int, world_size: int) -> Strategy:
    """Import only the engine asked for: DeepSpeed is heavy and optional."""
    if name == "single":
        from zerotune.strategies.single import SingleDeviceStrategy as cls
    elif name == "ddp":
        from zerotune.strategies.ddp import DDPStrategy as cls
    elif name == "fsdp":
        from zerotune.strategies.fsdp import FSDPStrategy as cls
    elif name == "deepspeed":
        from zerotune.strategies.deepspeed import DeepSpeedStrategy as cls
    else:
        raise ValueError(f"unknown strategy {name!r}")
    return cls(config, device, rank, world_size)
