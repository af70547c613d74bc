"""Checkpoints: atomic, checksummed, and holding everything needed to continue a run step for step.

Layout under ``<output_dir>/checkpoints/``::

    step-00000010/              a complete checkpoint; it got this name by an atomic rename
        manifest.json           written last: the step and every file with its size and SHA-256
        trainer_state.json      step, data position, loss history, skipped steps, MLflow run id, engine
        rng-rank-0.pt ...       each rank's RNG states (tensors and ints; read with weights_only=True)
        ...                     the engine's own files (Strategy.save_state)
    .staging-step-00000012/     a save in progress: never taken for a checkpoint, removed by the next save

A crash or SIGKILL during a save leaves only a staging directory, so ``--resume`` takes the previous
complete checkpoint. Before a resume the workers check every file against the manifest (size, then
checksum); a damaged checkpoint is skipped with one line naming the file, and the run continues from the
newest intact one. Format-1 manifests recorded sizes only: those checkpoints are checked by size.
A disk that fills up during a save removes that save's staging directory and raises CheckpointSpaceError
on every rank. Nothing here imports torch.distributed: the strategy passed in does every collective step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from zerotune.errors import ConfigError, ZerotuneError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STAGING_PREFIX = ".staging-"
FORMAT_VERSION = 2  # 1: each file with its size; 2: each file with {"size", "sha256"}
# SHA-256 runs on the CPU's SHA instructions (x86 SHA-NI, ARMv8): 0.87 GB/s a core on the 2-core CPU box,
# where BLAKE2b gave 0.32 GB/s. benchmarks/checkpoint_hashing.py measures what hashing adds to a save.
CHECKSUM = "sha256"
READ_CHUNK = 8 * 2**20  # bytes per read while hashing; hashlib releases the GIL on each update
STEP_DIRECTORY = re.compile(r"step-[0-9]+")
STAGING_DIRECTORY = re.compile(re.escape(STAGING_PREFIX) + r"step-[0-9]+")
# A full disk that raises no OSError with errno ENOSPC: torch.save's zip writer says "unexpected pos" (or "file
# write failed"), safetensors' writer "No space left on device (os error 28)", DCP wraps the rank's error.
OUT_OF_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "unexpected pos",
                     "file write failed")


class CheckpointSpaceError(ZerotuneError):
    """The disk (or a quota) filled up during a save. That save's files are gone; earlier checkpoints stay."""


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
        synced = [disk.submit(_fsync_file, path) for path in paths]
        digests = list(cpu.map(file_digest, paths))
        return [{"size": done.result(), CHECKSUM: digest} for done, digest in zip(synced, digests)]


def _fsync_file(path: Path) -> int:
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


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def verified_restore(candidate: Path | None, output_dir: Path, strategy) -> Path | None:
    """Collective, in the workers before anything loads: the checkpoint to resume from, checksums read.

    ``candidate`` is the session's pick (the newest complete checkpoint, or Ray's copy of one); None means a
    fresh start. It and every checkpoint directory of the run are tried newest first. Each rank hashes its
    share of a checkpoint's files and every rank sees every rank's finding, so all ranks pick the same one.
    Each checkpoint passed over is said in one line on rank 0."""
    if candidate is None:
        return None
    order = strategy.all_gather_object(_resume_order(candidate, output_dir) if strategy.is_main else None)[0]
    chosen, skipped = None, []
    for checkpoint in order:
        found = strategy.all_gather_object(problem_with(checkpoint, strategy.rank, strategy.world_size))
        problem = next((p for p in found if p), None)
        if problem is None:
            chosen = checkpoint
            break
        skipped.append((checkpoint, problem))
    if strategy.is_main:
        outcome = f"resuming from {chosen.name}" if chosen else "no earlier checkpoint is intact"
        for checkpoint, problem in skipped:
            print(f"zerotune: checkpoint {checkpoint.name}: {problem}; skipped, {outcome}", file=sys.stderr,
                  flush=True)
    if chosen is None:
        raise ConfigError(f"{checkpoint_root(output_dir)}: no intact checkpoint to resume from (each is named above "
                          "with its damaged file); restore one from a copy or start a new --output-dir")
    return chosen


def _resume_order(candidate: Path, output_dir: Path) -> list[Path]:
    """The session's candidate and the run's checkpoint directories (torn ones too, so that they are named
    when passed over), newest first; at the same step the run's own directory first."""
    found = step_directories(output_dir)
    if candidate.resolve() not in {p.resolve() for p in found}:
        found.append(candidate)
    return sorted(found, key=lambda p: (step_of(p), p.parent.resolve() == checkpoint_root(output_dir).resolve()),
                  reverse=True)


# ---- RNG ----

def capture_rng(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(checkpoint: Path, rank: int, device: torch.device) -> bool:
    """Put back this rank's RNG states; False when the checkpoint has none for this rank (other worker count)."""
    path = checkpoint / f"rng-rank-{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


# ---- saving ----

def _fsync_dir(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _listing(staging: Path) -> dict[str, int]:
    return {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}


def seal_share(staging: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Manifest entries of this rank's share of the staged files (each read back, hashed and fsynced)."""
    names = share_of(_listing(staging), rank, world_size)
    return dict(zip(names, seal_files([staging / n for n in names])))


def commit(staging: Path, final: Path, step: int, entries: dict[str, dict[str, Any]] | None = None) -> None:
    """Write the manifest last, flush everything, then rename: the checkpoint exists all at once or not at all.
    ``entries``: the files already sealed (by every rank's seal_share); any other staged file is sealed here."""
    entries = dict(entries or {})
    missing = [name for name in _listing(staging) if name not in entries and name != MANIFEST]
    entries.update(zip(missing, seal_files([staging / n for n in missing])))
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(entries.items()))}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(staging / MANIFEST)
    _fsync_dir(staging)
    if final.exists():  # the same step saved again (e.g. after a restart): replace it only now, complete
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)


def is_own_checkpoint(path: Path) -> bool:
    """A directory zerotune committed: named step-N (a real directory, not a link), its manifest saying step N."""
    if not STEP_DIRECTORY.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
        return False
    try:
        return json.loads((path / MANIFEST).read_text())["step"] == step_of(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prune(output_dir: Path, keep: int, saved_step: int | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``: only zerotune's own (is_own_checkpoint), and none
    newer than ``saved_step``, the one just written (a later one that a resume passed over as damaged stays
    until the run saves that step again)."""
    kept = [p for p in complete_checkpoints(output_dir)
            if is_own_checkpoint(p) and (saved_step is None or step_of(p) <= saved_step)]
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the disk or a quota is full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in OUT_OF_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Save:
    """One save's steps, each followed by an agreement of every rank: a full disk on any rank removes the
    staging directory and raises CheckpointSpaceError on all of them, so no rank waits for one that left."""

    def __init__(self, strategy, output_dir: Path, step: int):
        self.strategy, self.output_dir, self.step = strategy, Path(output_dir), step
        self.root = checkpoint_root(output_dir)
        self.staging = self.root / f"{STAGING_PREFIX}{step_name(step)}"
        self.final = self.root / step_name(step)

    def together(self, action: Callable[[], Any] | None) -> list[Any]:
        """Run ``action`` here (None: nothing to do on this rank); every rank's result, in rank order."""
        result, full = None, False
        try:
            result = action() if action else None
        except Exception as error:
            if not out_of_space(error):
                raise
            full = True
        gathered = self.strategy.all_gather_object((result, full))
        if any(full for _, full in gathered):
            if self.strategy.is_main:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise CheckpointSpaceError(self.no_space_message())
        return [result for result, _ in gathered]

    def no_space_message(self) -> str:
        previous = newest_checkpoint(self.output_dir)
        then = (f"{previous.name} is intact; free space there and continue with the same command plus --resume"
                if previous else "no earlier checkpoint exists; free space there and start again")
        return f"no space left on {self.root} while saving checkpoint step {self.step}; its partial files were " \
               f"removed, {then}"

    def open_staging(self, trainer_state: dict[str, Any]) -> None:
        """Rank 0: clear saves that never committed (only directories named like ours), stage trainer state."""
        if self.root.is_dir():
            for stale in self.root.iterdir():
                if STAGING_DIRECTORY.fullmatch(stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
        self.staging.mkdir(parents=True)
        (self.staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))

    def write_rank_files(self, model) -> None:
        self.strategy.save_state(model, self.staging)
        torch.save(capture_rng(self.strategy.device), self.staging / f"rng-rank-{self.strategy.rank}.pt")

    def commit(self, sealed: list[dict[str, dict[str, Any]]], keep: int) -> None:
        entries = {name: entry for share in sealed for name, entry in share.items()}
        commit(self.staging, self.final, self.step, entries)
        prune(self.output_dir, keep, self.step)


def save_checkpoint(strategy, model, output_dir: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls this. Returns the committed directory. Raises CheckpointSpaceError on
    every rank when the disk fills up on any; the previous checkpoints stay as they were."""
    save = _Save(strategy, output_dir, step)
    main = strategy.is_main
    save.together((lambda: save.open_staging(trainer_state)) if main else None)
    save.together(lambda: save.write_rank_files(model))
    # Every rank has written: each reads back, hashes and fsyncs its share of the files.
    sealed = save.together(lambda: seal_share(save.staging, strategy.rank, strategy.world_size))
    save.together((lambda: save.commit(sealed, keep)) if main else None)
    return save.final


# ---- before a resume ----

# Fields whose change makes a resumed run a different run. Anything else (steps, lr, logging) may change.
RESUME_FIELDS = (
    "model.name", "adapter.method", "adapter.r", "adapter.alpha", "adapter.target_modules", "data.path",
    "data.eval_path", "data.template", "data.max_seq_len", "data.overlong", "data.eval_fraction", "data.packing",
    "data.subset", "data.mix", "data.columns", "data.system_prompt", "train.seed",
)


def _lookup(tree: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return tree.get(section, {}).get(name)


def _preflight_problem(checkpoint: Path) -> str | None:
    """The cheap part of the check, before any worker starts: sizes, and the trainer state's checksum (it is
    read here). verified_restore reads every other checksum in the workers, each rank its share."""
    problem = problem_with(checkpoint, only=[TRAINER_STATE])
    if problem is None:
        try:
            if not isinstance(read_trainer_state(checkpoint), dict):
                return f"{TRAINER_STATE} is not a JSON object"
        except (OSError, ValueError):
            return f"{TRAINER_STATE} is unreadable"
    return problem


def resumable_checkpoint(output_dir: Path) -> Path:
    """The newest checkpoint that passes the cheap check, or a ConfigError naming what is wrong."""
    candidates = step_directories(output_dir)
    problems = []
    for checkpoint in reversed(candidates):
        problem = _preflight_problem(checkpoint)
        if problem is None:
            return checkpoint
        problems.append(f"{checkpoint.name}: {problem}")
    found = f" ({'; '.join(problems[:3])})" if problems else ""
    raise ConfigError(f"{output_dir}: no complete checkpoint to resume from (under {CHECKPOINTS}/){found}; drop "
                      "--resume to start a new run, or point --output-dir at the run to continue")


def check_resumable(config, output_dir: Path) -> Path:
    """Before any worker starts: a complete checkpoint exists and the run's config still matches it."""
    import yaml

    output_dir = Path(output_dir)
    checkpoint = resumable_checkpoint(output_dir)
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{saved_path}: missing, so the run cannot be checked before resuming; "
                          "restore it or start a new --output-dir")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = config.to_dict()
    for key in RESUME_FIELDS:
        before, now = _lookup(saved, key), _lookup(current, key)
        if before is None and now in ("", []):  # a field added since that run, left at its empty default
            continue
        if before != now:
            raise ConfigError(f"cannot resume {output_dir}: {key} was {before!r} in its config.yaml, now {now!r}; "
                              "resume with the same value or start a new --output-dir")
    state = read_trainer_state(checkpoint)
    dist = current["distributed"]
    global_batch = config.train.batch_size * config.train.grad_accum * dist["num_workers"]
    if state["global_batch_size"] != global_batch:
        raise ConfigError(
            f"cannot resume {output_dir}: the global batch was {state['global_batch_size']} examples, now "
            f"{global_batch} (train.batch_size x train.grad_accum x distributed.num_workers); keep it equal "
            "so the data position stays exact")
    if state["format"] == "deepspeed" and dist["num_workers"] != state["world_size"]:
        raise ConfigError(f"cannot resume {output_dir}: its DeepSpeed checkpoint was written by "
                          f"{state['world_size']} workers and DeepSpeed does not reshard; use --num-workers "
                          f"{state['world_size']}")
    return checkpoint


def check_engine_matches(state: dict[str, Any], checkpoint: Path, strategy, train_examples: int) -> None:
    """In the workers, once the engine is known: same checkpoint format, resharding only where supported."""
    if state["format"] != strategy.checkpoint_format:
        raise ConfigError(f"{checkpoint}: written by the {state['strategy']} engine ({state['format']} format); "
                          f"resume with --strategy {state['strategy']}")
    if state["world_size"] != strategy.world_size and not strategy.reshardable:
        raise ConfigError(f"{checkpoint}: written by {state['world_size']} workers; {strategy.name} cannot "
                          f"reshard it, use --num-workers {state['world_size']}")
    if state["train_examples"] != train_examples:
        raise ConfigError(f"{checkpoint}: the run had {state['train_examples']} training examples, the data now "
                          f"gives {train_examples}; resume with the same data file or start a new --output-dir")
