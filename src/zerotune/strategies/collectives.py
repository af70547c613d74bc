"""torch.distributed helpers shared by the multi-process engines."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CollectivesMixin:
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    def all_gather_object(self, value):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        dist.barrier()
