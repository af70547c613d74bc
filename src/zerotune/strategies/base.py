"""The interface every engine implements. The training loop talks only to this."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

import torch

from zerotune.config import RunConfig

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Strategy(ABC):
    """Places the model, owns optimizer and scheduler, and hides gradient synchronisation."""

    name: str = "base"
    checkpoint_format: str = "replicated"  # what save_state writes; a resume needs the same format
    reshardable: bool = True  # whether a checkpoint loads on a different number of workers
    # whether the engine runs the forward in its own precision, with autocast off inside (the loop then enters none)
    own_precision: bool = False

    def __init__(self, config: RunConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def load_base_model(self, dtype: torch.dtype, total_steps: int, attention: str | None = None) -> torch.nn.Module:
        """The base model as this engine wants it before wrap(): by default whole, on this worker's device, with
        ``attention`` as resolved. Engines that can shard while loading (--sharded-loading) override this."""
        from zerotune.model import load_model

        return load_model(self.config.model, self.config.adapter.method, self.device, dtype, attention=attention)

    @property
    def gathers_per_module(self) -> bool:
        """Whether parameters exist only while their own module runs (ZeRO-3): code must then call each
        module rather than read a submodule's weight directly."""
        return False

    @abstractmethod
    def wrap(self, model: torch.nn.Module, build_optimizer: OptimizerFactory,
             build_scheduler: SchedulerFactory, total_steps: int) -> torch.nn.Module:
        """Return the model to call forward on; sets self.optimizer and self.scheduler."""

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients are synchronised only when ``sync`` is true."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    #: Whether optimizer_step drops a non-finite step on the device. The loop then reads a step's results back
    #: one step late, so the host never waits for the GPU; an engine that cannot drop a step is read at once.
    drops_steps_on_device: bool = True
    def optimizer_step(self, model: torch.nn.Module, loss_total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step the optimizer, zero gradients (the schedule advances in advance_schedule). Returns the pre-clip global grad norm and whether
        the update was applied, both as tensors on the device: nothing here waits for the GPU. A step whose
        loss (``loss_total``, the same on every rank) or gradient norm is not finite is never applied: the
        fused AdamW reads ``found_inf`` and leaves weights, moments and step count as they were."""
        max_norm = self.config.train.max_grad_norm
        # The optimizer's own list: walking a PEFT model's modules for it (about 2,700 for a 7B) took ~9 ms of
        # host time per step, 7% of a W1 step.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = self._global_norm(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        applied = torch.isfinite(grad_norm) & torch.isfinite(loss_total.to(grad_norm.device))
        self.optimizer.found_inf = (~applied).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def advance_schedule(self) -> None:
        """After each optimizer step, outside it: a step replayed as a CUDA graph reads a learning-rate tensor
        that this fills in place for the next replay."""
        self.scheduler.step()

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        """Collective. Write trainable weights, optimizer and scheduler state into ``directory``.
        Replicated engines: rank 0 writes one copy, which loads on any number of workers."""
        from safetensors.torch import save_file

        state = self.trainable_state_dict(model)
        if self.is_main:
            save_file({name: t.contiguous().clone() for name, t in state.items()}, str(directory / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load_state(self, model: torch.nn.Module, directory: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(directory / "trainable.safetensors"), device=str(self.device))
        load_trainable(self.unwrap(model), tensors, directory)
        states = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        settings = [(group.get("capturable", False), group["lr"]) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(states["optimizer"])
        # A checkpoint written with or without CUDA graphs resumes in either mode: this run's kind of
        # learning rate (tensor or number) and capturable flag stay; the saved values carry over.
        for group, (capturable, lr) in zip(self.optimizer.param_groups, settings):
            saved = float(group["lr"])
            group["capturable"] = capturable
            group["lr"] = lr.fill_(saved) if isinstance(lr, torch.Tensor) else saved
        self.scheduler.load_state_dict(states["scheduler"])
        # The schedule computes in numbers either way; it fills a tensor learning rate in place.
        self.scheduler.base_lrs = [float(lr) for lr in self.scheduler.base_lrs]
        self.scheduler._last_lr = [float(lr) for lr in self.scheduler._last_lr]

    def current_lr(self) -> float:
        """The learning rate of the next update, from the schedule on the host (a tensor learning rate, as
        CUDA graphs use, is never read back from the device)."""
        base = self.scheduler.base_lrs[0]
        base = self.config.train.lr if isinstance(base, torch.Tensor) else base
        return base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, value):
        """Every rank's ``value``, in rank order (a list of one in a single process)."""
        return [value]

    def barrier(self) -> None:
        pass

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The PEFT or transformers model inside whatever wrapper the engine added."""
        return model

    def trainable_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable tensors on CPU, on rank 0. LoRA gathers only the adapter."""
        inner = self.unwrap(model)
        names = {name for name, p in inner.named_parameters() if p.requires_grad}
        return {name: tensor.detach().cpu() for name, tensor in inner.state_dict().items() if name in names}

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the model on CPU, on rank 0 (for --method full)."""
        return {name: tensor.detach().cpu() for name, tensor in self.unwrap(model).state_dict().items()}

    def close(self) -> None:
        pass


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source) -> None:
    """Copy saved trainable tensors in; every trainable parameter must be covered, nothing else may be."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trainable:
        missing, extra = sorted(trainable - set(tensors)), sorted(set(tensors) - trainable)
        raise RuntimeError(f"{source}: checkpoint does not match the model's trainable parameters "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(tensors, strict=False)
