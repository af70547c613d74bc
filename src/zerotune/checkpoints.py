"""Checkpoints: atomic, verified, and holding everything needed to continue a run step for step.

Layout under ``<output_dir>/checkpoints/``::

    step-00000010/              a complete checkpoint; it got this name by an atomic rename
        manifest.json           written last: the step and every file with its size
        trainer_state.json      step, data position, loss history, skipped steps, MLflow run id, engine
        rng-rank-0.pt ...       each rank's RNG states (tensors and ints; read with weights_only=True)
        ...                     the engine's own files (Strategy.save_state)
    .staging-step-00000012/     a save in progress: never taken for a checkpoint, removed by the next save

A crash or SIGKILL during a save leaves only a staging directory, so ``--resume`` takes the previous
complete checkpoint. A checkpoint whose files no longer match its manifest (a truncated copy) is skipped.
Nothing here imports torch.distributed: the strategy passed in does every collective step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from zerotune.errors import ConfigError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STAGING_PREFIX = ".staging-"
FORMAT_VERSION = 1


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def is_complete(path: Path) -> bool:
    """A committed directory whose manifest lists files that all exist with their recorded sizes."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted((p for p in found if is_complete(p)), key=step_of)


def newest_checkpoint(output_dir: Path) -> Path | None:
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


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


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


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


def commit(staging: Path, final: Path, step: int) -> None:
    """Write the manifest last, flush everything, then rename: the checkpoint exists all at once or not at all."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files},
                                               indent=1))
    _fsync_tree(staging)
    if final.exists():  # the same step saved again (e.g. after a restart): replace it only now, complete
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)


def prune(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(strategy, model, output_dir: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls this. Returns the committed directory."""
    root = checkpoint_root(output_dir)
    staging = root / f"{STAGING_PREFIX}{step_name(step)}"
    final = root / step_name(step)
    if strategy.is_main:
        for stale in root.glob(f"{STAGING_PREFIX}*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    strategy.barrier()
    strategy.save_state(model, staging)
    torch.save(capture_rng(strategy.device), staging / f"rng-rank-{strategy.rank}.pt")
    strategy.barrier()
    if strategy.is_main:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        commit(staging, final, step)
        prune(output_dir, keep)
    strategy.barrier()
    return final


# Fields whose change makes a resumed run a different run. Anything else (steps, lr, logging) may change.
RESUME_FIELDS = (
    "model.name", "adapter.method", "adapter.r", "adapter.alpha", "adapter.target_modules", "data.path",
    "data.eval_path", "data.template", "data.max_seq_len", "data.overlong", "data.eval_fraction", "data.packing",
    "train.seed",
)


def _lookup(tree: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return tree.get(section, {}).get(name)


def check_resumable(config, output_dir: Path) -> Path:
    """Before any worker starts: a complete checkpoint exists and the run's config still matches it."""
    import yaml

    output_dir = Path(output_dir)
    checkpoint = newest_checkpoint(output_dir)
    if checkpoint is None:
        raise ConfigError(f"{output_dir}: no complete checkpoint to resume from (under {CHECKPOINTS}/); drop "
                          "--resume to start a new run, or point --output-dir at the run to continue")
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{saved_path}: missing, so the run cannot be checked before resuming; "
                          "restore it or start a new --output-dir")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = config.to_dict()
    for key in RESUME_FIELDS:
        before, now = _lookup(saved, key), _lookup(current, key)
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
