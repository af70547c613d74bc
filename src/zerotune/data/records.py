"""Read instruction records from local files or the hub, and check every record before any model loads.

Two ways in. ``read_table`` (the data cache's cold path and its preflight check) reads a dataset into a
memory-mapped Arrow table that is parsed and checked a batch at a time, so no process holds every record in
Python: a JSON lines file becomes one row per line (datasets' text reader; the JSON is parsed in the batch, so
an error names its line), Parquet, save_to_disk directories and hub datasets keep their own columns. A .json
document (one JSON value, parsed whole) and CSV/TSV (csv's row checks, every value read as text) still go
through ``read_records``, which returns Python lists; so do preference pairs and ``--no-data-cache``.
"""

from __future__ import annotations

import bisect
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerotune.data.templates import template_for_record
from zerotune.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv")


def looks_local(path: str) -> bool:
    return path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def read_records(path: str, split: str = "train", flag: str = "--data",
                 subset: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """Records plus, for each, where it came from (``file line N`` or ``file record N``) for error messages.
    ``flag`` names the option the path came from (--data or --eval-data) in a not-found message; ``subset`` is
    a hub dataset's configuration name (also of a local dataset repository folder)."""
    if not path:
        from zerotune.resources import SAMPLE_DATA, resource_path

        path = str(resource_path(SAMPLE_DATA))
    if looks_local(path):
        local = Path(path).expanduser()
        if subset and local.is_dir() and not is_saved_dataset(local):
            return _read_hub(path, split, subset)  # a dataset repository on disk: datasets reads its configs
        return _read_local(local, split, flag)
    return _read_hub(path, split, subset)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_local(path: Path, split: str, flag: str) -> tuple[list[dict[str, Any]], list[str]]:
    if is_saved_dataset(path):
        return _read_saved_dataset(path, split)
    if path.is_dir():
        return _read_shards(path, split, flag)
    if not path.is_file():
        raise DataError(f"{path}: data file not found; check the path given to {flag}")
    if path.suffix in (".csv", ".tsv"):
        return _read_delimited(path)
    if path.suffix == ".jsonl":
        records, where = [], []
        # utf-8-sig: a byte-order mark some editors write at the start is not part of record 1
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number}: malformed JSON ({error.msg}); fix or delete that line") from None
                records.append(record)
                where.append(f"{path} line {number}")
        return records, where
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno}: malformed JSON ({error.msg})") from None
        if isinstance(content, dict) and isinstance(content.get("data"), list):
            content = content["data"]
        if not isinstance(content, list):
            raise DataError(f"{path}: expected a JSON list of records (or JSON lines in a .jsonl file)")
        return content, [f"{path} record {i + 1}" for i in range(len(content))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as parquet

        rows = parquet.read_table(path).to_pylist()
        return rows, [f"{path} row {i + 1}" for i in range(len(rows))]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl, .parquet, .csv or .tsv")


def _read_shards(folder: Path, split: str, flag: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A folder of data files of one type (train-00000.jsonl, train-00001.jsonl, ...), read in name order."""
    shards = sorted(item for item in folder.iterdir() if item.is_file() and item.suffix in LOCAL_SUFFIXES)
    if not shards:
        raise DataError(f"{folder}: a directory with no .json, .jsonl, .parquet, .csv or .tsv files; give {flag} a "
                        "data file, a folder of them, or a directory written by datasets' save_to_disk")
    kinds = sorted({shard.suffix for shard in shards})
    if len(kinds) > 1:
        raise DataError(f"{folder}: holds files of several types ({', '.join(kinds)}); keep one type of shard per "
                        "folder or give one file")
    records, where = [], []
    for shard in shards:
        shard_records, shard_where = _read_local(shard, split, flag)
        records += shard_records
        where += shard_where
    return records, where


def _read_delimited(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """CSV (comma) or TSV (tab) with a header row; row N is the N-th record after the header."""
    import csv

    delimiter = "\t" if path.suffix == ".tsv" else ","
    records, where = [], []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file; it needs a header row and at least one record")
        try:
            for row in reader:
                place = f"{path} row {len(records) + 1} (line {reader.line_num})"
                if None in row:
                    raise DataError(f"{place}: {len(reader.fieldnames) + len(row[None])} fields, but the header has "
                                    f"{len(reader.fieldnames)}; quote values that hold a {'tab' if delimiter != ',' else 'comma'}")
                missing = [name for name, value in row.items() if value is None]
                if missing:
                    raise DataError(f"{place}: no value for column {missing[0]!r} (the row has fewer fields than the "
                                    "header)")
                records.append(row)
                where.append(place)
        except csv.Error as error:
            raise DataError(f"{path} line {reader.line_num}: malformed {path.suffix[1:].upper()} ({error})") from None
    return records, where


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars while datasets reads or converts: a read that fails leaves its one-line error alone."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_saved_dataset(path: Path, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a save_to_disk directory; of a DatasetDict, the rows of ``split`` (--split)."""
    rows = _load_saved(path, split).to_list()
    return rows, [f"{path} row {i + 1}" for i in range(len(rows))]


def _load_saved(path: Path, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a datasets save_to_disk directory, and reading it needs the 'datasets' package: "
                        "pip install 'zerotune[hub]', or export it to .jsonl") from None
    with quiet_datasets():
        table = datasets.load_from_disk(str(path))
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise DataError(f"{path}: no split {split!r} in this saved dataset (it has {', '.join(table)}); "
                            "pass --split")
        table = table[split]
    return table


def _read_hub(dataset_id: str, split: str, subset: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    rows = _load_hub(dataset_id, split, subset).to_list()
    return rows, [f"{dataset_id} row {i + 1}" for i in range(len(rows))]


def _load_hub(dataset_id: str, split: str, subset: str = ""):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{dataset_id!r} is not a local file, and reading hub datasets needs the 'datasets' package: "
            "pip install 'zerotune[hub]', or pass a local .jsonl file"
        ) from None
    named = f"{dataset_id!r} (subset {subset!r}, split {split!r})" if subset else f"{dataset_id!r} (split {split!r})"
    try:
        with quiet_datasets():
            table = datasets.load_dataset(dataset_id, subset or None, split=split)
    except Exception as error:  # the hub raises many types; the user needs one message
        reason = str(error).splitlines()[0][:200] if isinstance(error, ValueError) else type(error).__name__
        raise DataError(
            f"cannot load hub dataset {named}: {reason}; check --subset and --split, and if you are offline, "
            "download it once or pass a local .jsonl/.json/.parquet file"
        ) from None
    return table


@dataclass
class RecordTable:
    """One dataset's records in an Arrow table (datasets.Dataset, memory-mapped), read a batch at a time.

    ``kind``: "lines" (column ``text``, one row per line of JSON lines files, blank ones included), "columns"
    (the records' own columns) or "json" (columns ``record``, a record as JSON text, and ``where``: the list
    path's records, for the formats read whole)."""

    rows: Any
    kind: str
    parts: list[tuple[int, str]]  # per file: its first row and how a place in it is named ("data.jsonl line")

    def place(self, index: int) -> str:
        first, prefix = self.parts[bisect.bisect_right([start for start, _ in self.parts], index) - 1]
        return f"{prefix} {index - first + 1}"

    def records(self, batch: dict[str, list], indices: list[int]) -> tuple[list[Any], list[str]]:
        """The records of one batch of rows (``datasets.map(batched=True, with_indices=True)``) with their places;
        blank lines are skipped, a malformed one raises DataError naming file and line."""
        if self.kind == "json":
            return [json.loads(text) for text in batch["record"]], batch["where"]
        if self.kind == "columns":
            names = list(batch)
            records = [dict(zip(names, values)) for values in zip(*batch.values())] if names else []
            return records, [self.place(index) for index in indices]
        records, where = [], []
        for line, index in zip(batch["text"], indices):
            if not line.strip():
                continue
            place = self.place(index)
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{place}: malformed JSON ({error.msg}); fix or delete that line") from None
            where.append(place)
        return records, where


def read_table(path: str, split: str = "train", flag: str = "--data", subset: str = "",
               cache_dir: str | None = None) -> RecordTable:
    """``read_records``' records, as a RecordTable. ``cache_dir``: where datasets writes the Arrow copy of a
    local file (its own cache when None)."""
    if not path:
        from zerotune.resources import SAMPLE_DATA, resource_path

        path = str(resource_path(SAMPLE_DATA))
    local = Path(path).expanduser()
    if not looks_local(path) or (subset and local.is_dir() and not is_saved_dataset(local)):
        return _columns(_load_hub(path, split, subset), f"{path} row")
    if is_saved_dataset(local):
        return _columns(_load_saved(local, split), f"{local} row")
    if local.is_dir():
        return _table_of_shards(local, split, flag, cache_dir)
    if local.is_file() and local.suffix == ".jsonl":
        import datasets

        with quiet_datasets():
            rows = datasets.load_dataset("text", data_files=str(local), split="train", cache_dir=cache_dir,
                                         encoding="utf-8-sig")
        return RecordTable(rows, "lines", [(0, f"{local} line")])
    if local.is_file() and local.suffix == ".parquet":
        import datasets

        with quiet_datasets():
            rows = datasets.load_dataset("parquet", data_files=str(local), split="train", cache_dir=cache_dir)
        return _columns(rows, f"{local} row")
    records, where = _read_local(local, split, flag)  # .json, .csv, .tsv, or a missing or unknown file's error
    return _json_table(records, where)


def _columns(rows, prefix: str) -> RecordTable:
    return RecordTable(rows, "columns", [(0, prefix)])


def _json_table(records: list[Any], where: list[str]) -> RecordTable:
    import datasets

    rows = datasets.Dataset.from_dict({"record": [json.dumps(r, default=str) for r in records], "where": where})
    return RecordTable(rows, "json", [(0, "")])


def _table_of_shards(folder: Path, split: str, flag: str, cache_dir: str | None) -> RecordTable:
    """A folder of .jsonl or .parquet shards as one table (rows in name order, each named by its own file)."""
    import datasets

    shards = sorted(item for item in folder.iterdir() if item.is_file() and item.suffix in LOCAL_SUFFIXES)
    if not shards or {shard.suffix for shard in shards} not in ({".jsonl"}, {".parquet"}):
        return _json_table(*_read_shards(folder, split, flag))  # its error, or the formats read whole
    tables = [read_table(str(shard), split, flag, cache_dir=cache_dir) for shard in shards]
    try:
        rows = datasets.concatenate_datasets([table.rows for table in tables])
    except ValueError:  # Parquet shards of different columns: as lists, as read_records does
        return _json_table(*_read_shards(folder, split, flag))
    parts, first = [], 0
    for table in tables:
        parts.append((first, table.parts[0][1]))
        first += len(table.rows)
    return RecordTable(rows, tables[0].kind, parts)


def check_records(records: list[dict[str, Any]], where: list[str], template: str, source: str) -> None:
    """Every record must fit its template: alpaca needs instruction and output, chat needs messages."""
    if not records:
        raise DataError(f"{source}: the dataset is empty; it needs at least one record")
    for record, place in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(f"{place}: expected a JSON object, got {type(record).__name__}")
        if "chosen" in record and "rejected" in record:
            raise DataError(f"{place}: a preference pair (chosen, rejected), not an SFT record; train on pairs with "
                            "--objective dpo, orpo or simpo")
        kind = template_for_record(record, template)
        if kind == "chat":
            _check_chat(record, place)
            continue
        if kind == "tokens":
            _check_tokens(record, place)
            continue
        for name in ("instruction", "output"):
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(_wrong_type(place, name, value))
            if value is None or (name == "instruction" and not value.strip()):
                raise DataError(
                    f'{place}: missing field "{name}" (alpaca records need instruction, optional input, output)'
                )
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(_wrong_type(place, "input", record["input"]))


def _wrong_type(place: str, name: str, value: Any) -> str:
    """Not coerced: a number where text belongs is more often a column mix-up than a wanted answer."""
    return (f'{place}: field "{name}" has the wrong type: expected a string, got {type(value).__name__} '
            f'{json.dumps(value, ensure_ascii=False)[:40]} (write it as "{name}": "...")')


def _check_tokens(record: dict[str, Any], place: str) -> None:
    ids = record.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise DataError(f'{place}: field "input_ids" must be a non-empty list of token ids (integers >= 0)')
    labels = record.get("labels")
    if labels is None:
        return
    if not isinstance(labels, list) or len(labels) != len(ids) or not all(isinstance(i, int) for i in labels):
        raise DataError(f'{place}: field "labels" must be a list of integers as long as "input_ids" '
                        "(-100 for tokens not to learn)")
    if all(label == -100 for label in labels):
        raise DataError(f'{place}: every label is -100, so nothing to learn from this record')


def _check_chat(record: dict[str, Any], place: str) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{place}: missing field "messages" (chat records need a list of role/content messages)')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{place}: messages[{index}] needs role and content")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{place}: no assistant message, so nothing to learn from this conversation")
