"""Resuming: the cheap check before any worker starts (a complete checkpoint exists and the run's config still
matches it), the full check in the workers (verified_restore: every file against its checksum, the ranks
sharing the hashing), and putting back each rank's RNG states.

A damaged checkpoint is skipped with one line naming the file, and the run continues from the newest intact
one. The layout and the manifest are zerotune.checkpoints.manifest's.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from zerotune.checkpoints.manifest import (CHECKPOINTS, RANK_DATA, TRAINER_STATE, checkpoint_root, problem_with,
                                           step_directories, step_of)
from zerotune.errors import ConfigError



def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def read_rank_data(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's own data state (its stream position); a ConfigError when the checkpoint has none for it."""
    path = checkpoint / RANK_DATA.format(rank=rank)
    if not path.is_file():
        raise ConfigError(f"{checkpoint}: holds no stream position for worker {rank} of {world_size} (it was "
                          "written by another worker count, or without --streaming); resume as it was written")
    return json.loads(path.read_text())


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


# Fields whose change makes a resumed run a different run. Anything else (steps, lr, logging) may change.
RESUME_FIELDS = (
    "model.name", "adapter.method", "adapter.r", "adapter.alpha", "adapter.target_modules", "data.path",
    "data.eval_path", "data.template", "data.max_seq_len", "data.overlong", "data.eval_fraction", "data.packing",
    "data.subset", "data.mix", "data.columns", "data.system_prompt", "data.streaming", "train.seed",
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
        if before is None and now in ("", [], False):  # a field added since that run, left at its empty default
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
    if state.get("streaming") and dist["num_workers"] != state["world_size"]:
        raise ConfigError(f"cannot resume {output_dir}: its stream was split between {state['world_size']} workers, "
                          f"each keeping its own place; use --num-workers {state['world_size']}")
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
