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


def first_fit_rows(lengths, row_length: int):
    """First-fit decreasing: (the row of each example, the number of rows). Examples go longest first (ties by
    position), each into the first row with room for it, else into a new row at the end.

    A max-tree over the rows' free room finds that row in O(log n), so a million examples pack in seconds; rows
    not yet opened hold row_length free, so the leftmost leaf with room is the first open row that fits or
    else the next new one."""
    from array import array

    import numpy

    lengths = numpy.asarray(lengths, dtype=numpy.int64)
    if len(lengths) and lengths.max() > row_length:
        raise ValueError(f"an example of {lengths.max()} tokens is longer than a row of {row_length}")
    order = numpy.lexsort((numpy.arange(len(lengths)), -lengths))
    leaves = 1 << max(0, (len(lengths) - 1).bit_length())
    free = array("q", [row_length]) * (2 * leaves)  # node i: the most free room of any row below it
    row_of = numpy.empty(len(lengths), dtype=numpy.int64)
    rows = 0
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row_of[index] = node - leaves
        rows = max(rows, node - leaves + 1)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return row_of, rows


def _members(row_of, rows: int):
    """Per row, its examples in position order: (flat example indices, row offsets into them)."""
    import numpy

    flat = numpy.lexsort((numpy.arange(len(row_of)), row_of))
    offsets = numpy.concatenate([[0], numpy.cumsum(numpy.bincount(row_of, minlength=rows))])
    return flat, offsets


def _joined(members_ids, members_labels) -> tuple[list[int], list[int], list[int]]:
    input_ids, labels, positions = [], [], []
    for ids, example_labels in zip(members_ids, members_labels):
        input_ids += ids
        labels += [IGNORE_INDEX] + list(example_labels[1:])
        positions += range(len(ids))
    return input_ids, labels, positions


def pack_examples(examples: list[EncodedExample], row_length: int) -> tuple[list[EncodedExample], PackingReport]:
    row_of, rows = first_fit_rows([len(example.input_ids) for example in examples], row_length)
    flat, offsets = _members(row_of, rows)
    packed = [packed_row([examples[i] for i in flat[offsets[row]:offsets[row + 1]].tolist()]) for row in range(rows)]
    real = sum(len(example.input_ids) for example in examples)
    return packed, PackingReport(len(examples), len(packed), real, row_length)


def packed_row(examples: list[EncodedExample]) -> EncodedExample:
    """One row of ``examples`` in this order, each with its own positions and no target on its first token."""
    return EncodedExample(*_joined([example.input_ids for example in examples],
                                   [example.labels for example in examples]))


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


def pack_table(table, rows_used, row_length: int, cache_file: str, num_proc: int | None = None):
    """pack_examples' rows, exactly, for the examples ``rows_used`` (numpy indices) of an Arrow table
    (datasets.Dataset of input_ids and labels, no indices mapping): the lengths come from Arrow and the rows are
    joined by datasets' map into ``cache_file``, so no process holds the tokens in Python lists. Returns (the
    packed table, its report)."""
    import uuid

    import datasets
    import pyarrow
    import pyarrow.compute as compute

    from zerotune.data.encode import map_processes

    lengths = compute.list_value_length(table.data.column("input_ids")).to_numpy()[rows_used]
    row_of, rows = first_fit_rows(lengths, row_length)
    flat, offsets = _members(row_of, rows)
    members = pyarrow.ListArray.from_arrays(pyarrow.array(offsets, pyarrow.int32()),
                                            pyarrow.array(rows_used[flat], pyarrow.int64()))
    groups = datasets.Dataset(datasets.table.InMemoryTable(pyarrow.table({"members": members})))

    def join(batch):
        gathered = table[[i for members in batch["members"] for i in members]]
        columns = {"input_ids": [], "labels": [], "position_ids": []}
        start = 0
        for members in batch["members"]:
            end = start + len(members)
            for name, value in zip(columns, _joined(gathered["input_ids"][start:end],
                                                    gathered["labels"][start:end])):
                columns[name].append(value)
            start = end
        return columns

    num_proc = map_processes(len(rows_used)) if num_proc is None else num_proc if num_proc > 1 else None
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int32"))
                                  for name in ("input_ids", "labels", "position_ids")})
    packed = groups.map(join, batched=True, batch_size=256, num_proc=num_proc,
                        remove_columns=["members"], features=features, cache_file_name=cache_file,
                        new_fingerprint=uuid.uuid4().hex, desc="packing")
    return packed, PackingReport(len(rows_used), rows, int(lengths.sum()), row_length)
