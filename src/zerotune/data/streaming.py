"""--streaming: training records read lazily from the hub or local JSONL/JSON/Parquet shards, tokenized and packed
by a background thread a few steps ahead of the training step, each worker reading its own share.

Why datasets' IterableDataset, not a reader of our own: it already streams hub datasets and local shards alike,
splits them between workers (``split_dataset_by_node``: whole shards to each worker when their count divides by
the worker count, else every world_size-th record), and its ``state_dict()`` after a record is the exact place
of the next one (shard index, record within it; tests/test_streaming.py resumes from every record). What it
cannot know is how far the training step has got: the reader thread runs ahead. So every row it hands over
carries the position *after* it (the dataset's state, the pass, and when packing the packer's open rows), and a
checkpoint stores the position of the last row a step took (``position``), per worker.

The stream has no shuffle: records come in shard order and, within a shard, in file order. At its end it starts
again (the next pass) until --max-steps; --epochs is not used (zerotune.config_checks). Nothing is held out of a
stream: evaluation reads --eval-data whole.
"""

from __future__ import annotations

import glob
import queue
import threading
from pathlib import Path
from typing import Any, Iterator

from zerotune.config import DataConfig
from zerotune.data.encode import EncodedExample, encode_records
from zerotune.data.formats import normalize_records, parse_columns
from zerotune.data.packing import StreamPacker
from zerotune.data.records import check_records, looks_local
from zerotune.data.templates import check_template_name
from zerotune.errors import ConfigError, DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # datasets' packaged readers
OPEN_ROWS = 8  # rows the packer keeps open: more fill rows better, and a checkpoint holds them all
STEPS_AHEAD = 4  # rows ready beyond the step being trained, in steps: the reader's head start
CHUNK = 64  # records tokenized in one call of the tokenizer
POSITION_FILE = "data-rank-{rank}.json"  # each worker's stream position in a checkpoint


def source_name(config: DataConfig) -> str:
    if config.path:
        return config.path
    from zerotune.resources import SAMPLE_DATA, resource_path

    return str(resource_path(SAMPLE_DATA))


def local_shards(path: str) -> list[Path]:
    """The files of a local stream: one file, every data file of a folder, or a glob's matches, in name order."""
    if any(char in path for char in "*?["):
        files = sorted(Path(match) for match in glob.glob(str(Path(path).expanduser())) if Path(match).is_file())
        if not files:
            raise DataError(f"{path}: no file matches this pattern; check the path given to --data")
    elif Path(path).expanduser().is_dir():
        folder = Path(path).expanduser()
        files = sorted(item for item in folder.iterdir() if item.is_file() and item.suffix in BUILDERS)
        if not files:
            raise DataError(f"{folder}: no .jsonl, .json or .parquet files to stream; give --data a folder of such "
                            "shards, or drop --streaming")
    else:
        files = [Path(path).expanduser()]
        if not files[0].is_file():
            raise DataError(f"{path}: data file not found; check the path given to --data")
    kinds = sorted({file.suffix for file in files})
    if kinds[0] not in BUILDERS or len(kinds) > 1:
        raise DataError(f"{path}: --streaming reads .jsonl, .json or .parquet shards of one type, found "
                        f"{', '.join(kinds)}; convert them, or drop --streaming")
    return files


def open_dataset(config: DataConfig, rank: int, world_size: int):
    """This worker's share of the records as an IterableDataset (one pass)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    from zerotune.data.records import quiet_datasets

    path = source_name(config)
    local = looks_local(path) or any(char in path for char in "*?[")
    try:
        with quiet_datasets():
            if local:
                files = local_shards(path)
                dataset = datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                                split="train", streaming=True)
            else:
                dataset = datasets.load_dataset(path, config.subset or None, split=config.split, streaming=True)
    except DataError:
        raise
    except Exception as error:  # the hub and the readers raise many types; the user needs one line
        raise DataError(f"cannot stream {path!r} (split {config.split!r}): {_reason(error)}; check --data, "
                        "--subset and --split") from None
    return split_dataset_by_node(dataset, rank, world_size) if world_size > 1 else dataset


def _reason(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _innermost(state: dict | None) -> dict:
    """The shard reader's part of a dataset state: {"shard_idx": ..., "shard_example_idx": ...}."""
    while isinstance(state, dict) and "shard_idx" not in state:
        state = state.get("examples_iterable")
    return state or {}


def check_stream(config: DataConfig) -> None:
    """Preflight: the stream opens and its first record fits the template (the rest is checked as it streams)."""
    check_template_name(config.template)
    columns = parse_columns(config.columns)
    dataset = open_dataset(config, 0, 1)
    try:
        first = next(iter(dataset), None)
    except Exception as error:
        raise DataError(f"{source_name(config)}: cannot read the first record ({_reason(error)})") from None
    if first is None:
        raise DataError(f"{source_name(config)}: the stream is empty; it needs at least one record")
    place = f"{source_name(config)} record 1"
    check_records(normalize_records([first], [place], columns, config.system_prompt), [place], config.template,
                  source_name(config))


class TrainingStream:
    """This worker's training rows, in order. ``micro_batches`` takes a step's rows; ``position`` says where the
    stream stands after the rows taken so far; ``resume`` (before the first take) continues from such a place."""

    def __init__(self, config: DataConfig, tokenizer, rank: int, world_size: int, rows_per_step: int):
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size
        self.columns = parse_columns(config.columns)
        # (dataset state, pass, records read, open rows) after the last row taken; a None state: the pass's start
        self.taken: tuple[dict | None, int, tuple[int, int], list] = (None, 0, (0, 0), [])
        self.rows: queue.Queue = queue.Queue(maxsize=rows_per_step * STEPS_AHEAD)
        self.stop = threading.Event()
        self.reader: threading.Thread | None = None

    def resume(self, position: dict[str, Any]) -> None:
        if position.get("world_size") != self.world_size:
            raise ConfigError(f"the checkpoint's stream was split between {position.get('world_size')} workers; "
                              f"resume a --streaming run with --num-workers {position.get('world_size')}")
        open_rows = [[EncodedExample(m["input_ids"], m["labels"]) for m in row] for row in position["open_rows"]]
        self.taken = (position["dataset"], position["pass"], (position["records_read"], position["records_in_pass"]),
                      open_rows)

    def position(self) -> dict[str, Any]:
        """JSON-ready: where this worker's stream continues. ``dataset`` is datasets' own state (the shard, and the
        record within it as its reader counts them: Arrow tables read and how far into the last); the counts are
        this worker's records (read, and read in this pass), for people; ``open_rows``: the packer's."""
        state, pass_index, records, open_rows = self.taken
        return {"world_size": self.world_size, "pass": pass_index, "records_read": records[0],
                "records_in_pass": records[1], "dataset": state,
                "open_rows": [[{"input_ids": m.input_ids, "labels": m.labels} for m in row] for row in open_rows]}

    def micro_batches(self, batch_size: int, grad_accum: int) -> list[list[EncodedExample]]:
        rows = [self._take() for _ in range(batch_size * grad_accum)]
        return [rows[micro * batch_size:(micro + 1) * batch_size] for micro in range(grad_accum)]

    def _take(self) -> EncodedExample:
        if self.reader is None:
            self.reader = threading.Thread(target=self._read, name="zerotune-stream", daemon=True)
            self.reader.start()
        item = self.rows.get()
        if isinstance(item, BaseException):
            self.rows.put(item)  # every later take raises it too
            raise item
        row, self.taken = item
        return row

    def close(self) -> None:
        self.stop.set()
        if self.reader is not None:
            self.reader.join(timeout=30)

    def _read(self) -> None:
        """The reader thread: rows with the position after each, until closed; an error is handed over as is."""
        try:
            for item in self._tagged_rows():
                if not self._hand_over(item):
                    return
        except BaseException as error:  # raised in the training loop, where the run can report it
            self._hand_over(error if isinstance(error, DataError) else
                            DataError(f"{source_name(self.config)}: streaming failed ({_reason(error)})"))

    def _hand_over(self, item) -> bool:
        """Queue ``item`` once there is room; False when the stream was closed first."""
        while not self.stop.is_set():
            try:
                self.rows.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _tagged_rows(self) -> Iterator[tuple[EncodedExample, tuple]]:
        state, pass_index, records, open_rows = self.taken
        packer = StreamPacker(self.config.max_seq_len, OPEN_ROWS, open_rows) if self.config.packing else None
        while not self.stop.is_set():
            whole_pass, kept = state is None, 0
            for chunk in self._chunks(state, pass_index, records):
                for example, (state, records) in chunk:
                    kept += example is not None
                    row = packer.add(example) if packer and example else example
                    if row is not None:
                        yield row, (state, pass_index, records, packer.snapshot() if packer else [])
            if whole_pass and not kept:  # else the next pass would find nothing either, for ever
                raise DataError(f"{source_name(self.config)}: worker {self.rank}'s share of the stream (of "
                                f"{self.world_size} workers) has no example that fits --max-seq-len "
                                f"{self.config.max_seq_len} ({records[1]} records); add data, use fewer workers or "
                                "raise --max-seq-len")
            state, pass_index, records = None, pass_index + 1, (records[0], 0)

    def _chunks(self, state: dict | None, pass_index: int, records: tuple[int, int]):
        """Lists of (example or None if dropped, (dataset state, (records read, of them in this pass)) after it),
        in record order."""
        dataset = open_dataset(self.config, self.rank, self.world_size)
        if state is not None:
            dataset.load_state_dict(state)
        read: list[tuple[dict, dict, tuple[int, int]]] = []
        for record in dataset:
            records = (records[0] + 1, records[1] + 1)
            read.append((record, dataset.state_dict(), records))
            if len(read) == CHUNK:
                yield self._encode(read, pass_index)
                read = []
            if self.stop.is_set():
                return
        if read:
            yield self._encode(read, pass_index)

    def _encode(self, read: list[tuple[dict, dict, tuple[int, int]]], pass_index: int) -> list:
        where = [self._place(state, count, pass_index) for _, state, count in read]
        records = normalize_records([record for record, _, _ in read], where, self.columns, self.config.system_prompt)
        check_records(records, where, self.config.template, source_name(self.config))
        examples, _ = encode_records(self.tokenizer, records, where, self.config.template, self.config.max_seq_len,
                                     self.config.overlong, keep_dropped=True)
        return [(example, (state, count)) for example, (_, state, count) in zip(examples, read)]

    def _place(self, state: dict, count: tuple[int, int], pass_index: int) -> str:
        shard = _innermost(state).get("shard_idx", 0) + 1
        of = f"of worker {self.rank}'s share, " if self.world_size > 1 else ""
        return f"{source_name(self.config)} record {count[1]} ({of}pass {pass_index + 1}, near shard {shard})"


def streamed_data(config: DataConfig, tokenizer, rank: int, world_size: int, gather, rows_per_step: int):
    """(PreparedData with the eval set only, read whole from --eval-data; this worker's TrainingStream)."""
    from zerotune.data.encode import EncodeReport
    from zerotune.data.prepare import PreparedData, encode_sharded, load_and_check

    evaluation = []
    if config.eval_path:
        records, where = load_and_check(config, config.eval_path)
        evaluation, _ = encode_sharded(config, tokenizer, records, where, rank, world_size, gather)
    stream = TrainingStream(config, tokenizer, rank, world_size, rows_per_step)
    return PreparedData([], evaluation, EncodeReport()), stream
