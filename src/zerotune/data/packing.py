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
    packed = [packed_row([examples[index] for index in sorted(members)]) for members in rows]
    real = sum(len(example.input_ids) for example in examples)
    return packed, PackingReport(len(examples), len(packed), real, row_length)


def packed_row(examples: list[EncodedExample]) -> EncodedExample:
    """One row of ``examples`` in this order, each with its own positions and no target on its first token."""
    input_ids, labels, positions = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        positions += list(range(len(example.input_ids)))
    return EncodedExample(input_ids, labels, positions)


class StreamPacker:
    """Packing for a stream (zerotune.data.streaming), where the whole set is never in hand: first-fit into at
    most ``open_limit`` open rows, in arrival order; an example that fits none closes the oldest row. The open
    rows are the packer's whole state, so a checkpoint that holds them resumes the packing exactly."""

    def __init__(self, row_length: int, open_limit: int = 8, open_rows: list[list[EncodedExample]] | None = None):
        self.row_length, self.open_limit = row_length, open_limit
        self.open_rows: list[list[EncodedExample]] = [list(row) for row in open_rows or []]

    def add(self, example: EncodedExample) -> EncodedExample | None:
        """Place ``example``; returns the row it closed, if any."""
        length = len(example.input_ids)
        for row in self.open_rows:
            if sum(len(member.input_ids) for member in row) + length <= self.row_length:
                row.append(example)
                return None
        closed = self.open_rows.pop(0) if len(self.open_rows) == self.open_limit else None
        self.open_rows.append([example])
        return packed_row(closed) if closed else None

    def snapshot(self) -> list[list[EncodedExample]]:
        """The open rows as they are now (the examples are never changed, so sharing them is safe)."""
        return [list(row) for row in self.open_rows]
