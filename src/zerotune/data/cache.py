"""A cache of prepared data: the tokenized (and, with --packing, packed) train and eval sets as Arrow files,
memory-mapped on load, so a rerun, a ``--resume`` and every worker of a run read them instead of tokenizing.

The key hashes everything that changes the result and nothing else:
- each dataset's content (a SHA-256 of its files, so touching or copying a file keeps the key; a hub dataset by
  its id, subset, split and datasets' own fingerprint), its template, split, subset and mixture share;
- the tokenizer (its full serialisation, chat template and special tokens);
- max_seq_len, overlong, packing, columns, system_prompt, the eval file or fraction;
- the seed, where it decides something (a held-out eval fraction, or a mixture's draw);
- the source of zerotune's data code, so a change to templates or encoding never reads a stale entry.
One process fills an entry while the others wait on its file lock, then map it (one per node with a node-local
cache directory, one in all with a shared one). An entry appears complete or not at all (written aside, renamed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from zerotune.config import DataConfig
from zerotune.data.encode import EncodedExample, EncodeReport
from zerotune.data.mixture import Source, training_sources
from zerotune.data.records import looks_local
from zerotune.errors import DataError

CACHE_FORMAT = 1
REPORT_FILE = "report.json"


def cache_root(config: DataConfig) -> Path:
    """data.cache_dir, else $ZEROTUNE_DATA_CACHE, else $XDG_CACHE_HOME/zerotune/data (~/.cache/zerotune/data)."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    if os.environ.get("ZEROTUNE_DATA_CACHE"):
        return Path(os.environ["ZEROTUNE_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zerotune" / "data"


def _sha256(path: Path) -> str:
    status = path.stat()
    return _sha256_of(str(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(name: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, once per process while its size and modification time stay (preflight asks twice)."""
    path = Path(name)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def content_fingerprint(path: str, split: str, subset: str) -> dict[str, Any]:
    """What a dataset holds: its files' bytes for a local path (every file of a folder), else the hub's id and
    datasets' fingerprint of the split it downloaded."""
    if not path:
        from zerotune.resources import SAMPLE_DATA, resource_path

        path = str(resource_path(SAMPLE_DATA))
    if looks_local(path) and Path(path).expanduser().exists():
        local = Path(path).expanduser().resolve()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        return {"path": str(local), "split": split, "subset": subset,
                "files": [[str(p.relative_to(local)) if local.is_dir() else p.name, _sha256(p)] for p in files]}
    import datasets

    from zerotune.data.records import quiet_datasets

    try:
        with quiet_datasets():
            table = datasets.load_dataset(path, subset or None, split=split)
    except Exception:  # the read that follows reports it in one line
        return {"hub": path, "split": split, "subset": subset, "fingerprint": None}
    return {"hub": path, "split": split, "subset": subset, "fingerprint": table._fingerprint}


def code_fingerprint() -> str:
    """The source of zerotune's data package: what turns records into examples."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (Python) tokenizer: datasets' hasher pickles it
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
             tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


def data_fingerprint(config: DataConfig, seed: int) -> dict[str, Any]:
    """Everything about the records (not the tokenizer or the encoding) that changes the prepared data."""
    sources: list[Source] = training_sources(config)
    draws = any(s.weight is not None or s.examples is not None for s in sources)
    holds_out = not config.eval_path and config.eval_fraction > 0
    return {
        "sources": [{**dataclasses.asdict(source), "path": None,
                     "content": content_fingerprint(source.path, source.split, source.subset)} for source in sources],
        "eval": content_fingerprint(config.eval_path, config.split, config.subset) if config.eval_path else None,
        "eval_fraction": config.eval_fraction if holds_out else None,
        "columns": config.columns, "system_prompt": config.system_prompt,
        "seed": seed if draws or holds_out else None,
    }


def result_key(config: DataConfig, tokenizer, seed: int) -> str:
    """The key of the prepared data: the records, the tokenizer, the encoding settings and the code."""
    parts = {"format": CACHE_FORMAT, "code": code_fingerprint(), "data": data_fingerprint(config, seed),
             "tokenizer": tokenizer_fingerprint(tokenizer), "template": config.template,
             "max_seq_len": config.max_seq_len, "overlong": config.overlong, "packing": config.packing}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class ExampleTable(Sequence):
    """Encoded examples read from a memory-mapped Arrow table: indexing decodes one row, nothing else is held."""

    def __init__(self, table):
        self.table = table
        self.packed = "position_ids" in table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> EncodedExample:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.table[int(index)]
        return EncodedExample(row["input_ids"], row["labels"], row.get("position_ids"))

    def __iter__(self):
        for batch in self.table.iter(batch_size=1024):
            positions = batch.get("position_ids") or [None] * len(batch["input_ids"])
            for input_ids, labels, position_ids in zip(batch["input_ids"], batch["labels"], positions):
                yield EncodedExample(input_ids, labels, position_ids)


def _to_table(examples: Sequence[EncodedExample]):
    import datasets

    if isinstance(examples, ExampleTable):  # already Arrow (prepare_tables): written as it is
        return examples.table

    columns = {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    if examples and examples[0].position_ids is not None:
        columns["position_ids"] = [e.position_ids for e in examples]
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int32")) for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _save(table, folder: Path) -> None:
    """save_to_disk; a large table is copied by datasets' worker processes, so this process never maps all its
    pages (they would count in its resident memory, growing with the data)."""
    from zerotune.data.encode import map_processes

    table.save_to_disk(str(folder), num_proc=map_processes(len(table)))


def _write(entry: Path, prepared) -> None:
    from zerotune.data.records import quiet_datasets

    staging = entry.with_name(f"{entry.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with quiet_datasets():
        _save(_to_table(prepared.train), staging / "train")
        if len(prepared.eval):  # datasets writes no data file for an empty table
            _save(_to_table(prepared.eval), staging / "eval")
    report = {"report": dataclasses.asdict(prepared.report),
              "packing": dataclasses.asdict(prepared.packing) if prepared.packing else None}
    (staging / REPORT_FILE).write_text(json.dumps(report))
    os.replace(staging, entry)
    if prepared.scratch:
        shutil.rmtree(prepared.scratch, ignore_errors=True)


def _read(entry: Path):
    import datasets

    from zerotune.data.packing import PackingReport
    from zerotune.data.prepare import PreparedData
    from zerotune.data.records import quiet_datasets

    saved = json.loads((entry / REPORT_FILE).read_text())
    with quiet_datasets():
        train = datasets.load_from_disk(str(entry / "train"))
        evaluation = ExampleTable(datasets.load_from_disk(str(entry / "eval"))) if (entry / "eval").is_dir() else []
    packing = PackingReport(**saved["packing"]) if saved["packing"] else None
    return PreparedData(ExampleTable(train), evaluation, EncodeReport(**saved["report"]), packing)


def check_once(config: DataConfig, seed: int, check: Callable[[], None]) -> None:
    """Run ``check`` (read and check every record) unless these exact records were checked before."""
    marker = cache_root(config) / "checked" / hashlib.sha256(
        json.dumps({"code": code_fingerprint(), "data": data_fingerprint(config, seed),
                    "template": config.template}, sort_keys=True).encode()).hexdigest()[:32]
    if marker.is_file():
        return
    check()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # cached() names an unwritable cache directory when it needs it
        pass


def cached(config: DataConfig, tokenizer, seed: int, prepare: Callable[[], Any]):
    """The prepared data of this key: read from the cache, or made by ``prepare`` (by the one process that gets
    the lock first) and written there. Returns (prepared data, whether it was a hit)."""
    from filelock import FileLock

    root = cache_root(config)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{root}: cannot create the data cache ({error.strerror}); set --data-cache-dir to a "
                        "writable directory or pass --no-data-cache") from None
    entry = root / result_key(config, tokenizer, seed)
    with FileLock(str(entry) + ".lock"):
        if (entry / REPORT_FILE).is_file():
            return _read(entry), True
        _write(entry, prepare())
    return _read(entry), False
