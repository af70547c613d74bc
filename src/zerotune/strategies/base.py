"""The interface every engine implements. The training loop talks only to this."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from typing import Callable, Iterator

import torch

from zerotune.config import RunConfig

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Strategy(ABC):
    """Places the model, owns optimizer and scheduler, and hides gradient synchronisation."""

    name: str = "base"

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

    def optimizer_step(self, model: torch.nn.Module) -> torch.Tensor:
        """Clip, step optimizer and scheduler, zero gradients. Returns the pre-clip global grad norm."""
        max_norm = self.config.train.max_grad_norm
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

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
