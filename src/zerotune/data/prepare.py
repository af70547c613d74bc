"""From config to encoded train and eval examples; the same code runs in preflight and in every worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from zerotune.config import DataConfig
from zerotune.data.encode import EncodedExample, EncodeReport, all_dropped_error, encode_records
from zerotune.data.pairs import check_pairs, encode_pairs
from zerotune.data.records import check_records, read_records
from zerotune.data.templates import check_template_name


@dataclass
class PreparedData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    report: EncodeReport
    packing: Any = None  # a PackingReport when data.packing is on


def packed(config: DataConfig, data: PreparedData) -> PreparedData:
    """Training rows are packed; evaluation stays one example per row, so eval loss is comparable."""
    if not config.packing:
        return data
    from zerotune.data.packing import pack_examples

    rows, report = pack_examples(data.train, config.max_seq_len)
    return PreparedData(rows, data.eval, data.report, report)


def load_and_check(config: DataConfig, path: str, pairs: bool = False):
    """Read and check the records; ``pairs``: preference pairs (a preference objective), else SFT records."""
    check_template_name(config.template)
    flag = "--eval-data" if path and path == config.eval_path and path != config.path else "--data"
    records, where = read_records(path, config.split, flag)
    (check_pairs if pairs else check_records)(records, where, config.template, path)
    return records, where


def single_process_gather(value: Any) -> list[Any]:
    return [value]


def encode_sharded(config: DataConfig, tokenizer, records, where, rank: int, world_size: int,
                   gather: Callable[[Any], list[Any]], pairs: bool = False) -> tuple[list, EncodeReport]:
    """Each worker tokenizes records rank, rank + world_size, ...; ``gather`` (an all-gather supplied by
    the engine) gives every worker the whole list back in the original order. ``pairs``: EncodedPairs."""
    mine = list(range(rank, len(records), world_size))
    encode = encode_pairs if pairs else encode_records
    encoded, report = encode(tokenizer, [records[i] for i in mine], [where[i] for i in mine],
                                     config.template, config.max_seq_len, config.overlong, keep_dropped=True)
    shards = gather((encoded, report))
    examples: list[EncodedExample | None] = [None] * len(records)
    total = EncodeReport()
    for shard_rank, (shard, shard_report) in enumerate(shards):
        for index, example in zip(range(shard_rank, len(records), world_size), shard):
            examples[index] = example
        total.merge(shard_report)
    kept = [example for example in examples if example is not None]
    total.kept = len(kept)
    if not kept:
        raise all_dropped_error(total, config.max_seq_len, config.overlong)
    return kept, total


def prepare_data(config: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 gather: Callable[[Any], list[Any]] = single_process_gather, pairs: bool = False) -> PreparedData:
    """``pairs``: the records are preference pairs (zerotune.data.pairs), for a preference objective."""
    records, where = load_and_check(config, config.path, pairs)
    examples, report = encode_sharded(config, tokenizer, records, where, rank, world_size, gather, pairs)
    if config.eval_path:
        eval_records, eval_where = load_and_check(config, config.eval_path, pairs)
        eval_examples, _ = encode_sharded(config, tokenizer, eval_records, eval_where, rank, world_size, gather,
                                          pairs)
        return packed(config, PreparedData(examples, eval_examples, report))
    if config.eval_fraction == 0 or len(examples) < 2:
        return packed(config, PreparedData(examples, [], report))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(config.eval_fraction * len(examples)))
    eval_set = set(order[:held_out])
    train = [example for index, example in enumerate(examples) if index not in eval_set]
    evaluation = [examples[index] for index in sorted(eval_set)]
    return packed(config, PreparedData(train, evaluation, report))
