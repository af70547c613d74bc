"""Rules that turn "auto" settings into decisions, as pure functions of the config and the machine.

What the machine is (``Machine``) is read once, from torch, by whoever runs the rule; the rules themselves never
ask torch, so tests give them any machine (a GPU host answers a test the same as a CPU one).
"""

from __future__ import annotations

from dataclasses import dataclass

from zerotune.config import RunConfig


@dataclass(frozen=True)
class Machine:
    """The accelerator a worker runs on: its kind, and for CUDA the GPU's name, memory and count per host."""

    device_type: str = "cpu"
    gpu_name: str | None = None
    gpu_memory_bytes: int = 0
    gpus_per_host: int = 0

    @classmethod
    def of(cls, device) -> "Machine":
        """The machine as torch sees it for ``device`` (a torch.device, or None for the CPU)."""
        if device is None or device.type != "cuda":
            return cls(device_type="cpu" if device is None else device.type)
        import torch

        return cls("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory,
                   torch.cuda.device_count())


def explain_strategy(config: RunConfig, world_size: int, machine: Machine = Machine()) -> tuple[str, str]:
    """The documented rule for --strategy auto (docs, 'Choosing an engine'), and why it chose:
    a DeepSpeed JSON means DeepSpeed; one worker means single; several GPU workers get the faster of DDP and
    FSDP2 that fits, as `zerotune plan` predicts it; where the plan does not know the GPU or the model, DDP when
    the model and its training state fit one GPU with room for activations, else FSDP2. On CPU: DDP."""
    wanted = config.distributed.strategy
    if wanted != "auto":
        return wanted, "asked for"
    if config.distributed.deepspeed_config and not config.distributed.no_deepspeed:
        return "deepspeed", "a DeepSpeed JSON was given"
    if world_size == 1:
        return "single", "one worker"
    if machine.device_type != "cuda":
        return "ddp", "CPU workers"
    from zerotune.plan.report import auto_engine

    picked = auto_engine(config, world_size, machine.gpu_name, machine.gpus_per_host) if machine.gpu_name else None
    if picked:
        return picked
    from zerotune.model import training_state_bytes

    unknown = "GPU or model unknown to zerotune plan; chose by whether the training state fits one GPU"
    if training_state_bytes(config) > 0.6 * machine.gpu_memory_bytes:
        return "fsdp", unknown
    return "ddp", unknown


def choose_strategy(config: RunConfig, world_size: int, machine: Machine = Machine()) -> str:
    return explain_strategy(config, world_size, machine)[0]
