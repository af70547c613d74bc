"""Output directories zerotune owns: a marker, a lock and a writability probe.

zerotune deletes only what it wrote itself. A directory it creates or claims gets a marker file
(``.zerotune-run``: kind, version, time, host); ``--overwrite`` replaces only a marked directory of the same kind,
and even there deletes only the names zerotune writes (``TRAIN_OUTPUTS``, ``MERGE_OUTPUTS``), leaving anything
else in place. A run made before markers existed is recognised by its config.yaml and metrics.jsonl.

The lock (``.zerotune-lock``, holding host and PID) is an ``flock`` held by the launching process for the whole
run, so a second run into the same directory fails at once. The kernel drops it when the process dies, so the
file a killed run leaves behind blocks nobody.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from zerotune.errors import ConfigError, ZerotuneError

MARKER = ".zerotune-run"
LOCK_FILE = ".zerotune-lock"
PROBE_FILE = ".zerotune-write-probe"
OWN_FILES = frozenset({MARKER, LOCK_FILE, PROBE_FILE})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "additional_chat_templates", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "merges.txt", "vocab.txt",
})
# Top-level names a training run writes (train.py, tracking.py, checkpoints/, the Ray launcher).
TRAIN_OUTPUTS = TOKENIZER_FILES | {"adapter", "model", "checkpoints", "config.yaml", "resolved.yaml", "metrics.jsonl",
                                   "loss.png", "ray"}
# What save_pretrained writes for a merged model; weight shards are matched by prefix (is_merge_output).
MERGE_OUTPUTS = TOKENIZER_FILES | {"config.json", "generation_config.json", "model.safetensors.index.json",
                                   "pytorch_model.bin.index.json"}
KIND_NAMES = {"train": "a zerotune training run", "merge": "a model written by zerotune merge",
              "bench": "a zerotune bench work directory"}
# flock errors that mean "this filesystem cannot lock", not "someone holds it" (some FUSE, CIFS, Lustre mounts)
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def entries(directory: Path) -> list[str]:
    """The directory's names, without zerotune's own bookkeeping files; [] when it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name not in OWN_FILES)


def read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_legacy_run(directory: Path) -> bool:
    """A training run from a zerotune that wrote no marker: its config.yaml has zerotune's sections, and its
    metrics.jsonl or checkpoints/ are there. Anything less is not taken for a run."""
    import yaml

    if not (directory / "metrics.jsonl").is_file() and not (directory / "checkpoints").is_dir():
        return False
    try:
        saved = yaml.safe_load((directory / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"model", "data", "train", "output"} <= set(saved)


def directory_kind(directory: Path) -> str | None:
    """'train', 'merge' or 'bench' for a directory zerotune made, else None."""
    marker = read_marker(directory)
    if marker is not None:
        return marker.get("kind")
    return "train" if is_legacy_run(directory) else None


def check_owned(directory: Path, kind: str, overwrite: bool, resume: bool = False,
                flag: str = "--output-dir") -> None:
    """Refuse, in one line, a non-directory, a non-empty directory zerotune did not make, one of another kind,
    and (without --overwrite or --resume) a run of the same kind. Changes nothing."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory; pick another {flag}")
    if not entries(directory):
        return
    found = directory_kind(directory)
    if found is None:
        never = "zerotune writes and --overwrite deletes only in directories it made" if kind != "bench" else \
            "bench writes only into a directory it made"
        raise ConfigError(f"{directory}: holds files zerotune did not create (no {MARKER} marker, and not a run "
                          f"with config.yaml and metrics.jsonl); {never}, so pick an empty or new {flag}")
    if found != kind:
        raise ConfigError(f"{directory}: holds {KIND_NAMES.get(found, found)}, not {KIND_NAMES[kind]}; pick another "
                          f"{flag}")
    if not overwrite and not resume:
        what = "--overwrite to replace it" + (", --resume to continue it" if kind == "train" else "")
        raise ConfigError(f"{directory}: already holds {KIND_NAMES[kind]}; pass {what}, or pick another {flag}")


def probe_writable(directory: Path, flag: str = "--output-dir") -> None:
    """Create the directory, write, fsync and delete a probe file in it, then remove the directories this made:
    an unwritable, read-only or full place fails here, in one line, before any model loads."""
    missing = [parent for parent in [directory, *directory.parents] if not parent.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / PROBE_FILE
        with open(probe, "wb") as handle:
            handle.write(b"zerotune write probe\n")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{directory}: cannot write there ({error.strerror or error}); check the path and its "
                          f"permissions, or pick another {flag}") from None
    finally:
        for created in missing:  # deepest first; the run creates them again when it starts
            with contextlib.suppress(OSError):
                created.rmdir()


class RunLock:
    """An exclusive flock on ``<directory>/.zerotune-lock``, held until release() or this process ends."""

    def __init__(self, directory: Path, flag: str = "--output-dir"):
        self.path = directory / LOCK_FILE
        try:
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"{directory}: cannot write there ({error.strerror}); pick another {flag}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _holder(self.fd)
            self.release()
            if error.errno in NO_LOCKING:
                print(f"zerotune: warning: {directory}: this filesystem cannot lock ({error.strerror}); two runs "
                      "into this directory at once would not be stopped", file=sys.stderr)
                return
            raise _busy(directory, holder, flag) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "started": _now()}).encode() + b"\n")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exception) -> None:
        self.release()

    def __del__(self):
        self.release()


def check_unlocked(directory: Path, flag: str = "--output-dir") -> None:
    """Fail at once when another process holds the directory's lock; takes nothing and creates nothing."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in NO_LOCKING:
            raise _busy(directory, _holder(fd), flag) from None
    finally:
        os.close(fd)


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy(directory: Path, holder: dict, flag: str) -> ZerotuneError:
    who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}"
    return ZerotuneError(f"{directory}: another zerotune run is using this directory ({who}); wait for it to end "
                         f"or pick another {flag}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_marker(directory: Path, kind: str) -> None:
    from zerotune import __version__

    marker = {"kind": kind, "version": __version__, "created": _now(), "host": socket.gethostname()}
    (directory / MARKER).write_text(json.dumps(marker) + "\n")


def is_merge_output(name: str) -> bool:
    return name in MERGE_OUTPUTS or (name.startswith(("model", "pytorch_model"))
                                     and name.endswith((".safetensors", ".bin")))


def remove_outputs(directory: Path, kind: str) -> list[str]:
    """Delete what zerotune writes into a directory of this kind; returns the names it left in place."""
    ours = is_merge_output if kind == "merge" else TRAIN_OUTPUTS.__contains__
    kept = []
    for name in entries(directory):
        path = directory / name
        if not ours(name):
            kept.append(name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return kept


def claim_output_dir(directory: Path, kind: str, overwrite: bool, resume: bool = False,
                     flag: str = "--output-dir") -> RunLock:
    """Check, lock, and (with ``overwrite``) empty of zerotune's outputs, then mark the directory as this kind.
    Returns the lock; keep it for as long as the directory is being written."""
    check_owned(directory, kind, overwrite, resume, flag)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{directory}: cannot create it ({error.strerror}); pick another {flag}") from None
    lock = RunLock(directory, flag)
    check_owned(directory, kind, overwrite, resume, flag)  # again, now that no other run can change it
    if entries(directory) and overwrite:
        kept = remove_outputs(directory, kind)
        if kept:
            print(f"zerotune: --overwrite deleted zerotune's outputs in {directory} and left what it did not write "
                  f"there: {', '.join(kept)}", file=sys.stderr)
    if read_marker(directory) is None or not resume:
        write_marker(directory, kind)
    return lock


def prepare_output_dir(output_dir: Path, overwrite: bool, resume: bool = False) -> RunLock:
    """A training run's directory, called once before any worker starts (preflight checked it before anything
    loaded). A resumed run keeps everything in it."""
    return claim_output_dir(Path(output_dir), "train", overwrite, resume)
