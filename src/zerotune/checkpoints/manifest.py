"""A checkpoint's layout on disk, its manifest and checksums, and finding the complete ones.

Layout under ``<output_dir>/checkpoints/``::

    step-00000010/              a complete checkpoint; it got this name by an atomic rename
        manifest.json           written last: the step and every file with its size and SHA-256
        trainer_state.json      step, data position, loss history, skipped steps, MLflow run id, engine
        rng-rank-0.pt ...       each rank's RNG states (tensors and ints; read with weights_only=True)
        ...                     the engine's own files (Strategy.save_state)
    .staging-step-00000012/     a save in progress: never taken for a checkpoint, removed by the next save

Each file is checked against the manifest by size, then by checksum (problem_with); the ranks split the
hashing between them (share_of). Format-1 manifests recorded sizes only: those checkpoints are checked by size.
Writing a checkpoint is zerotune.checkpoints.save; choosing one to resume from, zerotune.checkpoints.resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RANK_DATA = "data-rank-{rank}.json"  # a rank's own data state: its place in a stream
STAGING_PREFIX = ".staging-"
FORMAT_VERSION = 2  # 1: each file with its size; 2: each file with {"size", "sha256"}
# SHA-256 runs on the CPU's SHA instructions (x86 SHA-NI, ARMv8): 0.87 GB/s a core on the 2-core CPU box,
# where BLAKE2b gave 0.32 GB/s. benchmarks/checkpoint_hashing.py measures what hashing adds to a save.
CHECKSUM = "sha256"
READ_CHUNK = 8 * 2**20  # bytes per read while hashing; hashlib releases the GIL on each update
STEP_DIRECTORY = re.compile(r"step-[0-9]+")
STAGING_DIRECTORY = re.compile(re.escape(STAGING_PREFIX) + r"step-[0-9]+")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


# ---- checksums, sizes, fsync ----

def seal_files(paths: list[Path]) -> list[dict[str, Any]]:
    """Manifest entries of just-written files. Each file is fsynced and, at the same time, read back (from
    the page cache) and hashed, so a save waits for the slower of the disk and the hashing, not for both.
    The engines' own writers (safetensors, torch.save, DCP, DeepSpeed) offer no hook to hash as they write."""
    if not paths:
        return []
    with ThreadPoolExecutor(min(len(paths), 16)) as disk, ThreadPoolExecutor(_hash_threads(paths)) as cpu:
        synced = [disk.submit(fsync_file, path) for path in paths]
        digests = list(cpu.map(file_digest, paths))
        return [{"size": done.result(), CHECKSUM: digest} for done, digest in zip(synced, digests)]


def fsync_file(path: Path) -> int:
    """Flush the file to disk; its size."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
        return os.fstat(handle.fileno()).st_size


def file_digest(path: Path) -> str:
    digest = hashlib.new(CHECKSUM)
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _hash_threads(paths: list[Path]) -> int:
    """A few files at once (hashlib releases the GIL), within this worker's share of the cores: the launchers
    set torch's thread count to it."""
    return max(1, min(4, len(paths), torch.get_num_threads()))


def share_of(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files this rank reads: largest first, each to the rank with the fewest bytes so far. Every rank
    computes the same split from the same names and sizes."""
    loads = [0] * world_size
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        target = loads.index(min(loads))
        loads[target] += sizes[name]
        if target == rank:
            mine.append(name)
    return mine


def read_manifest(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Each file's recorded entry; a format-1 manifest's bare sizes read as {"size": n}."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    return {str(name): entry if isinstance(entry, dict) else {"size": int(entry)}
            for name, entry in manifest["files"].items()}


def problem_with(checkpoint: Path, rank: int = 0, world_size: int = 1, checksums: bool = True,
                 only: list[str] | None = None) -> str | None:
    """What is wrong with a committed checkpoint, in words that name the file, or None. Every file's
    presence and size are checked; checksums (unless ``checksums`` is off) of this rank's share of the files,
    or of the files in ``only``."""
    try:
        entries = read_manifest(checkpoint)
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in sorted(entries.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} is {path.stat().st_size} bytes, its manifest says {entry.get('size')}"
    if not checksums:
        return None
    names = only if only is not None else share_of({n: e["size"] for n, e in entries.items()}, rank, world_size)
    names = [name for name in names if CHECKSUM in entries.get(name, {})]
    with ThreadPoolExecutor(_hash_threads(names)) as cpu:
        digests = list(cpu.map(file_digest, [checkpoint / n for n in names]))
    for name, digest in zip(names, digests):
        if digest != entries[name][CHECKSUM]:
            return f"{name} does not match its checksum"
    return None


# ---- finding checkpoints ----

def step_directories(output_dir: Path) -> list[Path]:
    """Directories named like zerotune's checkpoints (step-<digits>), oldest first, whatever their state."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIRECTORY.fullmatch(p.name) and p.is_dir()), key=step_of)


def is_complete(path: Path) -> bool:
    """Committed, and every file its manifest lists exists with its recorded size (checksums not read)."""
    return problem_with(path, checksums=False) is None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in step_directories(output_dir) if is_complete(p)]


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, by sizes: cheap, for a launcher's first pick. verified_restore reads
    the checksums before the workers load anything."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None
