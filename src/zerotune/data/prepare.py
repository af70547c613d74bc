"""From config to encoded train and eval examples; the same code runs in preflight and in every worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from zerotune.config import DataConfig
from zerotune.data.encode import EncodedExample, EncodeReport, all_dropped_error, encode_records
from zerotune.data.formats import normalize_records
from zerotune.data.mixture import Source, training_sources
from zerotune.data.pairs import check_pairs, encode_pairs
from zerotune.data.records import check_records, read_records
from zerotune.data.templates import check_template_name
from zerotune.errors import DataError


@dataclass
class LoadedRecords:
    """Checked records of one or more datasets, each with its place (for errors), its configured template and
    the index of the dataset it came from."""

    records: list[Any]
    where: list[str]
    templates: list[str]
    origins: list[int]
    sources: list[Source]
    available: list[int]  # records in each dataset before the mixture's draw


@dataclass
class PreparedData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    report: EncodeReport
    packing: Any = None  # a PackingReport when data.packing is on
    scratch: Any = None  # a folder of Arrow files the sets read from, removed once the cache entry is written


def packed(config: DataConfig, data: PreparedData, pairs: bool = False) -> PreparedData:
    """Training rows are packed; evaluation stays one example per row, so eval loss is comparable. Preference
    pairs are packed per micro-batch instead, when collated (zerotune.data.pairs.collate_pairs). (The cache's
    Arrow path packs with pack_table, in _prepare_tables.)"""
    if not config.packing or pairs:
        return data
    from zerotune.data.packing import pack_examples

    rows, report = pack_examples(list(data.train), config.max_seq_len)
    return PreparedData(rows, data.eval, data.report, report, data.scratch)


def _flag(config: DataConfig, path: str) -> str:
    """The option a dataset's path came from, for a not-found message."""
    return ("--eval-data" if path and path == config.eval_path and path != config.path else
            "--mix" if config.mix else "--data")


def eval_source(config: DataConfig) -> Source:
    return Source(config.eval_path, config.template, config.split, config.subset)


def load_and_check(config: DataConfig, path: str, source: Source | None = None, pairs: bool = False):
    """Read, normalize (columns, ShareGPT, system prompt) and check one dataset's records; ``pairs``: as
    preference pairs (a preference objective, zerotune.data.pairs), else as SFT records."""
    source = source or Source(path, config.template, config.split, config.subset)
    check_template_name(source.template)
    columns = source.renames(config)  # a config error before any file is read
    records, where = read_records(path, source.split, _flag(config, path), source.subset)
    records = normalize_records(records, where, columns, config.system_prompt)
    (check_pairs if pairs else check_records)(records, where, source.template, path)
    return records, where


def read_source(config: DataConfig, source: Source):
    """One dataset as a RecordTable (memory-mapped, zerotune.data.records) and ``read(batch, indices)``: the
    normalized, checked records of a batch of its rows, which raises DataError naming file and line."""
    from zerotune.data.cache import cache_root
    from zerotune.data.records import quiet_datasets, read_table

    check_template_name(source.template)
    columns = source.renames(config)
    # datasets' Arrow copy of a JSON lines or Parquet file, kept beside the cache: preflight and preparation share it
    with quiet_datasets():
        table = read_table(source.path, source.split, _flag(config, source.path), source.subset,
                           str(cache_root(config) / "read"))

    def read(batch, indices):
        records, where = table.records(batch, indices)
        records = normalize_records(records, where, columns, config.system_prompt)
        if records:
            check_records(records, where, source.template, source.path)
        return records

    return table, read


def empty_error(source: Source) -> DataError:
    return DataError(f"{source.path or 'the bundled sample'}: the dataset is empty; it needs at least one record")


def check_source(config: DataConfig, source: Source) -> None:
    """Every record of one dataset read, normalized and checked a batch at a time, by datasets' map over
    encode_table's processes (this process only waits: it never maps the dataset's pages)."""
    import os
    import uuid

    from zerotune.data.cache import cache_root
    from zerotune.data.encode import BATCH_RECORDS, map_processes
    from zerotune.data.records import quiet_datasets

    table, read = read_source(config, source)
    scratch = cache_root(config) / f"checking-{os.getpid()}.arrow"
    try:
        with quiet_datasets():
            counted = table.rows.map(lambda batch, indices: {"records": [len(read(batch, indices))]}, batched=True,
                                     with_indices=True, batch_size=BATCH_RECORDS,
                                     num_proc=map_processes(len(table.rows)),
                                     remove_columns=table.rows.column_names, cache_file_name=str(scratch),
                                     new_fingerprint=uuid.uuid4().hex)
        if not sum(counted["records"]):
            raise empty_error(source)
    finally:
        for leftover in scratch.parent.glob(f"{scratch.stem}*"):
            leftover.unlink(missing_ok=True)


def load_training_records(config: DataConfig, seed: int, pairs: bool = False) -> LoadedRecords:
    """Every training dataset read and checked, then drawn as the mixture asks (all records of a lone one)."""
    sources = training_sources(config)
    loaded = LoadedRecords([], [], [], [], sources, [])
    for position, source in enumerate(sources):
        records, where = load_and_check(config, source.path, source, pairs)
        chosen = source.draw(len(records), seed, position)
        loaded.records += [records[i] for i in chosen]
        loaded.where += [where[i] for i in chosen]
        loaded.templates += [source.template] * len(chosen)
        loaded.origins += [position] * len(chosen)
        loaded.available.append(len(records))
    return loaded


def check_data(config: DataConfig, seed: int, pairs: bool = False) -> None:
    """Preflight: every dataset read and checked before any model file is touched (once per content, with
    the data cache on; preference pairs are checked every time, as they are not cached)."""
    def check() -> None:
        load_training_records(config, seed, pairs)
        if config.eval_path:
            load_and_check(config, config.eval_path, pairs=pairs)

    def check_tables() -> None:  # what the cache's preparation reads (prepare_tables), read the same way
        for source in training_sources(config):
            check_source(config, source)
        if config.eval_path:
            check_source(config, eval_source(config))

    if not config.cache or pairs:
        return check()
    from zerotune.data.cache import check_once

    check_once(config, seed, check_tables)


def single_process_gather(value: Any) -> list[Any]:
    return [value]


def encode_sharded(config: DataConfig, tokenizer, records, where, rank: int, world_size: int,
                   gather: Callable[[Any], list[Any]], loaded: LoadedRecords | None = None, pairs: bool = False,
                   ) -> tuple[list, EncodeReport]:
    """Each worker tokenizes records rank, rank + world_size, ...; ``gather`` (an all-gather supplied by
    the engine) gives every worker the whole list back in the original order. ``loaded`` (training data) adds
    per-record templates and, for a mixture, what each dataset contributed to the report. ``pairs``: the
    records are preference pairs, encoded as EncodedPairs."""
    mine = list(range(rank, len(records), world_size))
    templates = [loaded.templates[i] for i in mine] if loaded else config.template
    encode = encode_pairs if pairs else encode_records
    encoded, report = encode(tokenizer, [records[i] for i in mine], [where[i] for i in mine],
                             templates, config.max_seq_len, config.overlong, keep_dropped=True)
    shards = gather((encoded, report))
    examples: list[EncodedExample | None] = [None] * len(records)
    total = EncodeReport()
    for shard_rank, (shard, shard_report) in enumerate(shards):
        for index, example in zip(range(shard_rank, len(records), world_size), shard):
            examples[index] = example
        total.merge(shard_report)
    kept = [example for example in examples if example is not None]
    total.kept = len(kept)
    if loaded and len(loaded.sources) > 1:
        for position, source in enumerate(loaded.sources):
            drawn = [i for i, origin in enumerate(loaded.origins) if origin == position]
            kept_here = sum(examples[i] is not None for i in drawn)
            total.sources.append(mixture_line(source, kept_here, len(drawn), loaded.available[position]))
    if not kept:
        raise all_dropped_error(total, config.max_seq_len, config.overlong)
    return kept, total


def mixture_line(source: Source, kept: int, drawn: int, available: int) -> str:
    """What one dataset of a mixture contributed: ``kept`` of its ``drawn`` records survived encoding, of the
    ``available`` it holds."""
    share = (f"weight {source.weight:g}" if source.weight is not None else
             f"examples={source.examples}" if source.examples is not None else "all")
    return f"{source.name} ({source.template}) {kept} examples ({drawn} drawn, {share}, of {available} records)"


def prepare_data(config: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                 gather: Callable[[Any], list[Any]] = single_process_gather, pairs: bool = False) -> PreparedData:
    """Train and eval examples. With the data cache on (the default) one process prepares them and every
    other reads the memory-mapped result (zerotune.data.cache); off, each worker tokenizes its share.
    ``pairs``: the records are preference pairs (zerotune.data.pairs), for a preference objective; the cache
    holds SFT examples only, so each worker encodes its share of the pairs."""
    if config.cache and not pairs:
        from zerotune.data.cache import cached

        data, _ = cached(config, tokenizer, seed, lambda: prepare_tables(config, tokenizer, seed))
        return data
    return prepare_uncached(config, tokenizer, seed, rank, world_size, gather, pairs)


def prepare_uncached(config: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1,
                     gather: Callable[[Any], list[Any]] = single_process_gather, pairs: bool = False) -> PreparedData:
    loaded = load_training_records(config, seed, pairs)
    examples, report = encode_sharded(config, tokenizer, loaded.records, loaded.where, rank, world_size, gather,
                                      loaded, pairs)
    if config.eval_path:
        eval_records, eval_where = load_and_check(config, config.eval_path, pairs=pairs)
        eval_examples, _ = encode_sharded(config, tokenizer, eval_records, eval_where, rank, world_size, gather,
                                          pairs=pairs)
        return packed(config, PreparedData(examples, eval_examples, report), pairs)
    if config.eval_fraction == 0 or len(examples) < 2:
        return packed(config, PreparedData(examples, [], report), pairs)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(config.eval_fraction * len(examples)))
    eval_set = set(order[:held_out])
    train = [example for index, example in enumerate(examples) if index not in eval_set]
    evaluation = [examples[index] for index in sorted(eval_set)]
    return packed(config, PreparedData(train, evaluation, report), pairs)


def prepare_tables(config: DataConfig, tokenizer, seed: int, num_proc: int | None = None) -> PreparedData:
    """prepare_uncached's examples, exactly (tests/test_data_cache.py), for the cache to write: each dataset read
    into Arrow (zerotune.data.records.read_table), checked and tokenized by datasets' map in parallel
    (``num_proc``; default: encode_table's) into Arrow files under the cache directory, which the train and eval
    sets read: no process holds the records or the tokens in Python lists."""
    import os
    import shutil

    from zerotune.data.cache import cache_root
    from zerotune.data.encode import encode_table
    from zerotune.data.records import quiet_datasets

    scratch = cache_root(config) / f"preparing-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)

    def encode(source: Source, name: str):
        """Every record of ``source``, checked and encoded (none dropped from the table: see its outcome)."""
        table, read = read_source(config, source)
        with quiet_datasets():
            encoded, _ = encode_table(tokenizer, table, read, source.template, config.max_seq_len, config.overlong,
                                      str(scratch / f"{name}.arrow"), num_proc)
        if not len(encoded):
            raise empty_error(source)
        return encoded

    try:
        return _prepare_tables(config, seed, scratch, encode)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _kept_rows(table, config: DataConfig, report: EncodeReport):
    """Indices (numpy) of the rows that survived encoding; raises when none did."""
    from zerotune.data.encode import DROPPED

    if not report.kept:
        raise all_dropped_error(report, config.max_seq_len, config.overlong)
    return (table.data.column("outcome").to_numpy() != DROPPED).nonzero()[0]


def _prepare_tables(config: DataConfig, seed: int, scratch, encode) -> PreparedData:
    import datasets
    import numpy

    from zerotune.data.cache import ExampleTable
    from zerotune.data.encode import DROPPED, table_report
    from zerotune.data.records import quiet_datasets

    sources = training_sources(config)
    parts, lines = [], []
    for position, source in enumerate(sources):
        encoded = encode(source, f"train-{position}")
        drawn = encoded
        if not source.takes_all:  # the mixture's draw, records repeated as it asks, written out in order
            drawn = encoded.select(source.draw(len(encoded), seed, position)).flatten_indices(
                cache_file_name=str(scratch / f"train-{position}-drawn.arrow"))
        kept = int((drawn.data.column("outcome").to_numpy() != DROPPED).sum())
        lines.append(mixture_line(source, kept, len(drawn), len(encoded)))
        parts.append(drawn)
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    report = table_report(table)
    if len(sources) > 1:
        report.sources = lines
    kept = _kept_rows(table, config, report)
    columns = ["input_ids", "labels"]

    def rows(source_table, indices) -> ExampleTable:
        return ExampleTable(source_table.select(indices).select_columns(columns))

    def prepared(train_rows, evaluation) -> PreparedData:
        if not config.packing:
            return PreparedData(rows(table, train_rows), evaluation, report, scratch=scratch)
        from zerotune.data.packing import pack_table

        with quiet_datasets():
            packed_rows, packing = pack_table(table.select_columns(columns), train_rows, config.max_seq_len,
                                              str(scratch / "packed.arrow"))
        return PreparedData(ExampleTable(packed_rows), evaluation, report, packing, scratch)

    if config.eval_path:
        eval_table = encode(eval_source(config), "eval")
        return prepared(kept, rows(eval_table, _kept_rows(eval_table, config, table_report(eval_table))))
    if config.eval_fraction == 0 or len(kept) < 2:
        return prepared(kept, [])
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).numpy()
    held_out = numpy.zeros(len(kept), dtype=bool)
    held_out[order[:max(1, round(config.eval_fraction * len(kept)))]] = True
    return prepared(kept[~held_out], rows(table, kept[held_out]))
