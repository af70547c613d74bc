"""Sequence packing: several short examples share one row of up to max_seq_len tokens.

Rows are filled first-fit-decreasing (deterministic: ties broken by position), so the packed set depends only
on the data and max_seq_len, never on the worker count. Each example keeps its own position ids (0, 1, ...),
which is how transformers recognises a packed row: with no attention mask, its mask builder makes attention
block-diagonal (SDPA, eager, flex) and flash-attention 2 runs varlen, so no token attends across examples.
The first token of every example is never a target (it would be predicted from the previous example).
"""

from __future__ import annotations

from dataclasses import dataclass

from zerotune.data.encode import IGNORE_INDEX, EncodedExample


@dataclass
class PackingReport:
    examples: int
    rows: int
    real_tokens: int
    row_length: int

    @property
    def efficiency(self) -> float:
        """Real tokens over the slots of rows padded to row_length."""
        return self.real_tokens / max(1, self.rows * self.row_length)

    def summary(self) -> str:
        return (f"packed {self.examples} examples into {self.rows} rows of up to {self.row_length} tokens "
                f"({self.efficiency:.1%} of the slots hold real tokens)")


def pack_examples(examples: list[EncodedExample], row_length: int) -> tuple[list[EncodedExample], PackingReport]:
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = len(examples[index].input_ids)
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(row_length - length)
    packed = []
    for members in rows:
        input_ids, labels, positions = [], [], []
        for index in sorted(members):
            example = examples[index]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX] + example.labels[1:]
            positions += list(range(len(example.input_ids)))
        packed.append(EncodedExample(input_ids, labels, positions))
    real = sum(len(example.input_ids) for example in examples)
    return packed, PackingReport(len(examples), len(packed), real, row_length)
