"""Writing a checkpoint: every rank writes its files into a staging directory, each reads back, hashes and
fsyncs its share of them, then rank 0 writes the manifest last and renames the directory into place (commit),
so the checkpoint exists all at once or not at all, and prunes the oldest beyond ``keep``.

A crash or SIGKILL during a save leaves only a staging directory, so ``--resume`` takes the previous complete
checkpoint. A disk that fills up during a save removes that save's staging directory and raises
CheckpointSpaceError on every rank. Nothing here imports torch.distributed: the strategy passed in does every
collective step. The layout and the manifest are zerotune.checkpoints.manifest's.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from zerotune.checkpoints.manifest import (FORMAT_VERSION, MANIFEST, RANK_DATA, STAGING_DIRECTORY, STAGING_PREFIX,
                                           STEP_DIRECTORY, TRAINER_STATE, checkpoint_root, complete_checkpoints,
                                           fsync_file, newest_checkpoint, seal_files, share_of, step_name, step_of)
from zerotune.errors import ZerotuneError

# A full disk that raises no OSError with errno ENOSPC: torch.save's zip writer says "unexpected pos" (or "file
# write failed"), safetensors' writer "No space left on device (os error 28)", DCP wraps the rank's error.
OUT_OF_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "unexpected pos",
                     "file write failed")


class CheckpointSpaceError(ZerotuneError):
    """The disk (or a quota) filled up during a save. That save's files are gone; earlier checkpoints stay."""


def capture_rng(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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
    fsync_file(staging / MANIFEST)
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

    def write_rank_files(self, model, rank_data: dict[str, Any] | None) -> None:
        self.strategy.save_state(model, self.staging)
        torch.save(capture_rng(self.strategy.device), self.staging / f"rng-rank-{self.strategy.rank}.pt")
        if rank_data is not None:  # this rank's place in a stream (zerotune.data.streaming)
            (self.staging / RANK_DATA.format(rank=self.strategy.rank)).write_text(json.dumps(rank_data))

    def commit(self, sealed: list[dict[str, dict[str, Any]]], keep: int) -> None:
        entries = {name: entry for share in sealed for name, entry in share.items()}
        commit(self.staging, self.final, self.step, entries)
        prune(self.output_dir, keep, self.step)


def save_checkpoint(strategy, model, output_dir: Path, step: int, trainer_state: dict[str, Any], keep: int,
                    rank_data: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls this. Returns the committed directory. Raises CheckpointSpaceError on
    every rank when the disk fills up on any; the previous checkpoints stay as they were. ``rank_data``: this
    rank's own JSON state (its stream position), written as RANK_DATA."""
    save = _Save(strategy, output_dir, step)
    main = strategy.is_main
    save.together((lambda: save.open_staging(trainer_state)) if main else None)
    save.together(lambda: save.write_rank_files(model, rank_data))
    # Every rank has written: each reads back, hashes and fsyncs its share of the files.
    sealed = save.together(lambda: seal_share(save.staging, strategy.rank, strategy.world_size))
    save.together((lambda: save.commit(sealed, keep)) if main else None)
    return save.final
