"""Checkpoints: atomic, checksummed, and holding everything needed to continue a run step for step.

    manifest.py   the layout on disk, the manifest with each file's size and SHA-256, finding complete ones
    save.py       writing one: stage, seal, commit by an atomic rename, prune; a full disk (CheckpointSpaceError)
    resume.py     choosing the one to resume from: the check before workers start, the checksums in them, RNG

The names the rest of zerotune uses are importable from here.
"""

from zerotune.checkpoints.manifest import complete_checkpoints, newest_checkpoint, step_name, step_of
from zerotune.checkpoints.resume import (check_engine_matches, check_resumable, read_rank_data, read_trainer_state,
                                         restore_rng, verified_restore)
from zerotune.checkpoints.save import CheckpointSpaceError, save_checkpoint

__all__ = ["CheckpointSpaceError", "check_engine_matches", "check_resumable", "complete_checkpoints",
           "newest_checkpoint", "read_rank_data", "read_trainer_state", "restore_rng", "save_checkpoint", "step_name",
           "step_of", "verified_restore"]
