"""Deterministic global batches, split across workers and micro-steps, and padding collation.

The global order depends only on the seed and the epoch, never on the worker count: a global batch of
``batch_size * grad_accum * world_size`` examples is the same set whether one worker runs 8 micro-batches
or two workers run 4 each. With token-weighted loss this makes runs comparable across worker counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from zerotune.data.encode import IGNORE_INDEX, EncodedExample
from zerotune.errors import DataError


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def check(self, source: str) -> None:
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{source}: {self.num_examples} training examples is fewer than one global batch "
                f"(batch_size {self.micro_batch_size} x grad_accum {self.grad_accum} x workers {self.world_size} "
                f"= {self.global_batch_size}); lower those or add data"
            )

    def epoch_order(self, epoch: int) -> list[int]:
        return _epoch_order(self.num_examples, self.seed, epoch).tolist()

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for one optimizer step."""
        start = step_in_epoch * self.global_batch_size
        batch = _epoch_order(self.num_examples, self.seed, epoch)[start : start + self.global_batch_size].tolist()
        size = self.micro_batch_size
        return [
            batch[(micro * self.world_size + rank) * size : (micro * self.world_size + rank + 1) * size]
            for micro in range(self.grad_accum)
        ]


@functools.lru_cache(maxsize=1)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation, drawn once per epoch (not per step) and kept as a tensor (8 bytes an example),
    not a Python list."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def collate(examples: list[EncodedExample], pad_token_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding gets label -100 and attention mask 0.
    Packed rows also get ``position_ids`` (padding counts 0, 1, ... as a sequence of its own); the model is
    then called without the attention mask, which makes transformers build per-example attention.
    ``pad_to`` pads every batch to one length (compiled layers then see one shape and never recompile)."""
    longest = max(max(len(example.input_ids) for example in examples), pad_to or 0)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    packed = examples[0].position_ids is not None
    if packed:
        position_ids = torch.arange(longest).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(example.position_ids)
            position_ids[row, length:] = torch.arange(longest - length)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def eval_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Contiguous eval batches, dealt round-robin to ranks; every example is seen exactly once."""
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    return batches[rank::world_size]


def even_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's eval batches as (indices, keep), as many on every rank: a sharding engine (FSDP2, ZeRO-3)
    gathers weights in each forward, so a rank that stopped early would leave the others waiting for ever. A
    rank with fewer batches scores a filler (its first example, not kept)."""
    mine = eval_batches(num_examples, batch_size, rank, world_size)
    rounds = -(-(-(-num_examples // batch_size)) // world_size)  # the most batches any rank has
    return [(indices, True) for indices in mine] + [([0], False)] * (rounds - len(mine))
