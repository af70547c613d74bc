"""Checkpoint integrity: checksums in the manifest, damaged checkpoints skipped on resume (one line naming the
file), a save that runs out of space, and retention that deletes only zerotune's own checkpoints.

Damage is done to real checkpoints of a tiny CPU run; the resumed run must then match the uninterrupted
run bit for bit (fp32 CPU, same worker count), as tests/test_resume.py shows a resume from any step does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import adapter_weights, losses_of
from zerotune.checkpoints import (CheckpointSpaceError, newest_checkpoint, save_checkpoint, step_name, step_of,
                                  verified_restore)
from zerotune.checkpoints import save as checkpoint_save
from zerotune.checkpoints.manifest import MANIFEST, TRAINER_STATE, problem_with, share_of
from zerotune.checkpoints.resume import resumable_checkpoint
from zerotune.checkpoints.save import commit, out_of_space, prune
from zerotune.cli import main
from zerotune.errors import ConfigError

STEPS = 6


def run_args(model, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps",
            str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--dtype", "fp32", "--max-seq-len", "128",
            "--eval-fraction", "0", "--lr", "1e-2", "--seed", "0", "--tracking", "none", "--quiet",
            "--save-steps", "2", "--keep-checkpoints", "5", "--lora-dropout", "0.1", *extra]


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / step_name(step)


@pytest.fixture(scope="module")
def reference(tiny_llama, alpaca_file, tmp_path_factory):
    """An uninterrupted run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(tiny_llama, alpaca_file, out)) == 0
    return out


def stopped_after(reference: Path, target: Path, step: int) -> Path:
    """The run directory as an interruption right after checkpoint ``step`` leaves it."""
    shutil.copytree(reference, target)
    for directory in (target / "checkpoints").iterdir():
        if step_of(directory) > step:
            shutil.rmtree(directory)
    shutil.rmtree(target / "adapter")
    (target / "loss.png").unlink(missing_ok=True)
    return target


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def damage_safetensors_header(directory: Path) -> str:
    overwrite(directory / "trainable.safetensors", 8, b"\xff" * 8)  # inside the JSON header, after its length
    return "trainable.safetensors does not match its checksum"


def zero_optimizer(directory: Path) -> str:
    path = directory / "optimizer.pt"
    path.write_bytes(bytes(path.stat().st_size))
    return "optimizer.pt does not match its checksum"


def truncate_optimizer(directory: Path) -> str:
    size = (directory / "optimizer.pt").stat().st_size
    (directory / "optimizer.pt").write_bytes(b"")
    return f"optimizer.pt is 0 bytes, its manifest says {size}"


def change_trainer_state_byte(directory: Path) -> str:
    """One byte that keeps the JSON valid: the step 4 becomes 7, which nothing but the checksum can notice."""
    text = (directory / TRAINER_STATE).read_text()
    assert text.count('"step": 4,') == 1
    (directory / TRAINER_STATE).write_text(text.replace('"step": 4,', '"step": 7,'))
    return "trainer_state.json does not match its checksum"


DAMAGE = {"safetensors_header": damage_safetensors_header, "optimizer_zeroed": zero_optimizer,
          "optimizer_truncated": truncate_optimizer, "trainer_state_byte": change_trainer_state_byte}


def test_manifest_records_each_files_size_and_sha256(reference):
    directory = checkpoint(reference, 4)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["step"] == 4
    on_disk = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_damaged_checkpoint(damage, reference, tiny_llama, alpaca_file, tmp_path, capsys):
    out = stopped_after(reference, tmp_path / "run", 4)
    problem = DAMAGE[damage](checkpoint(out, 4))
    capsys.readouterr()
    assert main(run_args(tiny_llama, alpaca_file, out, "--resume")) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "step-00000004" in line]
    assert said == [f"zerotune: checkpoint step-00000004: {problem}; skipped, resuming from step-00000002"], err
    # Continued from step 2 exactly as the uninterrupted run did: losses and adapter bit for bit.
    assert losses_of(out) == losses_of(reference)
    resumed, expected = adapter_weights(out), adapter_weights(reference)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)
    assert problem_with(checkpoint(out, 4)) is None, "the damaged checkpoint was written again when step 4 came"


def test_every_checkpoint_damaged_stops_naming_each(reference, tiny_llama, alpaca_file, tmp_path, capsys):
    out = stopped_after(reference, tmp_path / "run", 4)
    zero_optimizer(checkpoint(out, 4))
    damage_safetensors_header(checkpoint(out, 2))
    capsys.readouterr()
    assert main(run_args(tiny_llama, alpaca_file, out, "--resume")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-3:] == [
        "zerotune: checkpoint step-00000004: optimizer.pt does not match its checksum; skipped, no earlier "
        "checkpoint is intact",
        "zerotune: checkpoint step-00000002: trainable.safetensors does not match its checksum; skipped, no "
        "earlier checkpoint is intact",
        f"zerotune: error: {out / 'checkpoints'}: no intact checkpoint to resume from (each is named above with "
        "its damaged file); restore one from a copy or start a new --output-dir"]


def test_size_only_manifest_is_still_accepted(reference, tiny_llama, alpaca_file, tmp_path, capsys):
    """A checkpoint from before checksums (format 1: sizes only) resumes; a size mismatch still skips it."""
    out = stopped_after(reference, tmp_path / "run", 4)
    for step in (2, 4):
        manifest_path = checkpoint(out, step) / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
        manifest_path.write_text(json.dumps({"format_version": 1, "step": step, "files": sizes}, indent=1))
    assert problem_with(checkpoint(out, 4)) is None
    assert main(run_args(tiny_llama, alpaca_file, out, "--resume")) == 0
    assert "skipped" not in capsys.readouterr().err
    assert losses_of(out) == losses_of(reference)
    old = stopped_after(reference, tmp_path / "old", 2)
    manifest = json.loads((checkpoint(old, 2) / MANIFEST).read_text())
    size = manifest["files"]["optimizer.pt"]["size"]
    (checkpoint(old, 2) / MANIFEST).write_text(json.dumps({"format_version": 1, "step": 2, "files": {
        name: entry["size"] for name, entry in manifest["files"].items()}}))
    (checkpoint(old, 2) / "optimizer.pt").write_bytes(b"\0" * 10)
    assert problem_with(checkpoint(old, 2)) == f"optimizer.pt is 10 bytes, its manifest says {size}"


# ---- several ranks: each hashes its share, all agree ----

class ThreadGroup:
    """all_gather_object across threads, one per rank."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list = [None] * world_size

    def gather(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()
        return gathered


class ThreadRank:
    """The part of a Strategy that checkpoints use. save_state writes a per-rank shard (as FSDP and DeepSpeed
    do) and, on rank 0, a shared file; ``fail`` makes this rank's write raise instead."""

    def __init__(self, group: ThreadGroup, rank: int, fail: BaseException | None = None):
        self.group, self.rank, self.world_size, self.fail = group, rank, group.world_size, fail
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, value):
        return self.group.gather(self.rank, value)

    def barrier(self) -> None:
        self.group.gather(self.rank, None)

    def save_state(self, model, directory: Path) -> None:
        shard = directory / f"shard-{self.rank}.bin"
        if self.fail is not None:
            shard.write_bytes(b"partial")
            raise self.fail
        shard.write_bytes(bytes([self.rank]) * (1000 + self.rank))
        if self.is_main:
            (directory / "common.bin").write_bytes(b"c" * 10)


def on_ranks(world_size: int, work, failures: dict[int, BaseException] | None = None) -> list:
    """``work(rank_strategy)`` on each rank in its own thread; every rank's result or exception."""
    group = ThreadGroup(world_size)
    outcomes: list = [None] * world_size

    def run(rank: int) -> None:
        try:
            outcomes[rank] = work(ThreadRank(group, rank, (failures or {}).get(rank)))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcomes[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def save_on_ranks(out: Path, step: int, world_size: int = 2, failures=None) -> list:
    return on_ranks(world_size, lambda rank: save_checkpoint(rank, None, out, step, {"step": step}, keep=5), failures)


def test_ranks_hash_their_share_and_agree(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (2, 4):
        assert save_on_ranks(out, step) == [checkpoint(out, step)] * 2
    entries = json.loads((checkpoint(out, 4) / MANIFEST).read_text())["files"]
    assert sorted(entries) == ["common.bin", "rng-rank-0.pt", "rng-rank-1.pt", "shard-0.bin", "shard-1.bin",
                               TRAINER_STATE]
    assert all(len(entry["sha256"]) == 64 for entry in entries.values())
    # Damage a file in rank 1's share: rank 0, which says what was skipped, never reads it.
    sizes = {name: entry["size"] for name, entry in entries.items()}
    victim = share_of(sizes, 1, 2)[0]
    assert victim not in share_of(sizes, 0, 2)
    overwrite(checkpoint(out, 4) / victim, 0, b"\x07")
    capsys.readouterr()
    chosen = on_ranks(2, lambda rank: verified_restore(checkpoint(out, 4), out, rank))
    assert chosen == [checkpoint(out, 2)] * 2, "both ranks resume from the same checkpoint"
    assert capsys.readouterr().err.splitlines() == [
        f"zerotune: checkpoint step-00000004: {victim} does not match its checksum; skipped, resuming from "
        "step-00000002"]


def test_no_space_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    save_on_ranks(out, 2)
    outcomes = save_on_ranks(out, 4, failures={1: OSError(errno.ENOSPC, "No space left on device")})
    assert all(isinstance(o, CheckpointSpaceError) for o in outcomes), outcomes
    assert str(outcomes[0]).startswith(f"no space left on {out / 'checkpoints'} while saving checkpoint step 4;")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [step_name(2)]
    assert problem_with(checkpoint(out, 2)) is None


# ---- running out of space: simulated in the engine's write, and on a real full filesystem ----

TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), TORCH_FULL_DISK],
                         ids=["enospc", "torch_save"])
def test_full_disk_during_a_save_simulated(error, config_for, monkeypatch, capsys):
    """The engine's write fails the way a full disk makes it fail: the CLI says so in one line and exits 2,
    the save's staging directory is gone and the previous checkpoint is intact."""
    from zerotune.strategies.base import Strategy

    real = Strategy.save_state

    def fills_up_at_step_4(self, model, directory):
        if directory.name.endswith(step_name(4)):
            (directory / "optimizer.pt").write_bytes(b"partial")
            raise error
        real(self, model, directory)

    monkeypatch.setattr(Strategy, "save_state", fills_up_at_step_4)
    out = config_for().output.dir
    status = main(["train", "--model", str(config_for().model.name), "--data", str(config_for().data.path),
                   "--output-dir", out, "--max-steps", "6", "--save-steps", "2", "--tracking", "none", "--quiet",
                   "--dtype", "fp32", "--max-seq-len", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1] == (f"zerotune: error: no space left on {Path(out) / 'checkpoints'} while saving checkpoint step "
                       "4; its partial files were removed, step-00000002 is intact; free space there and continue "
                       "with the same command plus --resume")
    assert [p.name for p in (Path(out) / "checkpoints").iterdir()] == [step_name(2)]
    assert problem_with(checkpoint(Path(out), 2)) is None


def test_other_errors_are_not_taken_for_a_full_disk():
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(RuntimeError("CUDA out of memory"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("checkpoint failed") from inner
    except RuntimeError as outer:
        assert out_of_space(outer)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount, as in a container run as root); skipped where it cannot mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all the free space but ``leave`` bytes."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as handle:
        handle.truncate(0)
        remaining = stats.f_bavail * stats.f_frsize - leave
        block = bytes(2**20)
        while remaining > 0:
            handle.write(block[:min(remaining, len(block))])
            remaining -= len(block)
    return filler


def test_each_writer_full_disk_error_is_recognised(small_disk):
    """The errors the writers really raise on a full filesystem."""
    from safetensors.torch import save_file

    fill(small_disk, 0)
    raised = []
    for write in (lambda: torch.save({"x": torch.zeros(10_000)}, small_disk / "a.pt"),
                  lambda: save_file({"x": torch.zeros(10_000)}, str(small_disk / "b.safetensors")),
                  lambda: (small_disk / "c.json").write_text("x" * 10_000)):
        with pytest.raises(Exception) as caught:
            write()
        raised.append(caught.value)
    assert [type(error).__name__ for error in raised] == ["RuntimeError", "SafetensorError", "OSError"]
    assert "unexpected pos" in str(raised[0])
    assert all(out_of_space(error) for error in raised)


PAGE = 4096


@pytest.mark.slow  # three training runs; test_full_disk_during_a_save_simulated covers the same path in the fast tier
@pytest.mark.parametrize("room_for", [(), (TRAINER_STATE,), (TRAINER_STATE, "trainable.safetensors")],
                         ids=["nothing", "trainer_state", "weights"])
def test_full_disk_during_a_save_for_real(room_for, reference, small_disk, tiny_llama, alpaca_file, monkeypatch,
                                          capsys):
    """The output directory on a 4 MiB tmpfs, filled when the save of step 4 starts, leaving room for
    ``room_for`` (so the trainer state's write, safetensors' or torch.save's is the one that fails). Then
    the space comes back and --resume finishes the run as if nothing happened."""
    out = small_disk / "run"
    sizes = {name: entry["size"] for name, entry in
             json.loads((checkpoint(reference, 4) / MANIFEST).read_text())["files"].items()}
    leave = sum(-(-sizes[name] // PAGE) * PAGE for name in room_for)
    errors: list[BaseException] = []
    real_open, real_check = checkpoint_save._Save.open_staging, checkpoint_save.out_of_space
    filler = []

    def filled_at_step_4(self, trainer_state):
        if self.step == 4:
            filler.append(fill(small_disk, leave))
        real_open(self, trainer_state)

    def recorded(error):
        errors.append(error)
        return real_check(error)

    monkeypatch.setattr(checkpoint_save._Save, "open_staging", filled_at_step_4)
    monkeypatch.setattr(checkpoint_save, "out_of_space", recorded)
    assert main(run_args(tiny_llama, alpaca_file, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"zerotune: error: no space left on {out / 'checkpoints'} while saving checkpoint "
                              "step 4; its partial files were removed, step-00000002 is intact"), err[-3:]
    expected = {(): "OSError", (TRAINER_STATE,): "SafetensorError",
                (TRAINER_STATE, "trainable.safetensors"): "RuntimeError"}[room_for]
    assert [type(error).__name__ for error in errors] == [expected]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [step_name(2)]
    assert problem_with(checkpoint(out, 2)) is None
    filler[0].unlink()
    if room_for != ():
        return  # resuming once is enough
    # In a new process, as a person would run it (the failed run's process has ended there).
    resumed = subprocess.run([sys.executable, "-m", "zerotune", *run_args(tiny_llama, alpaca_file, out, "--resume")],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses_of(out) == losses_of(reference)


# ---- retention ----

def committed(out: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    staging = out / "checkpoints" / f".staging-{step_name(step)}"
    staging.mkdir(parents=True)
    for name, data in (files or {TRAINER_STATE: b"{}"}).items():
        (staging / name).write_bytes(data)
    commit(staging, checkpoint(out, step), step)
    return checkpoint(out, step)


def test_retention_deletes_only_zerotunes_checkpoints(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    for step in (1, 2, 3):
        committed(out, step)
    copy = root / "step-00000009"
    shutil.copytree(checkpoint(out, 1), copy)  # a person's copy: its manifest says step 1
    (root / "step-00000000").mkdir()  # named like ours, no manifest
    (root / "step-00000000" / "notes.txt").write_text("mine")
    (root / "step-00000004-best").mkdir()
    (root / ".staging-notes").mkdir()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint(out, 2), elsewhere)
    (elsewhere / MANIFEST).write_text(json.dumps({**json.loads((elsewhere / MANIFEST).read_text()), "step": 5}))
    (root / "step-00000005").symlink_to(elsewhere, target_is_directory=True)
    prune(out, keep=1, saved_step=10)
    assert sorted(p.name for p in root.iterdir()) == [
        ".staging-notes", "step-00000000", step_name(3), "step-00000004-best", "step-00000005", "step-00000009"]
    assert (elsewhere / MANIFEST).is_file()


def test_retention_keeps_the_checkpoint_just_saved_before_a_skipped_later_one(tmp_path):
    """After a resume from step 2 passed over a damaged step 4, the save of step 3 (--keep-checkpoints 1) must
    keep step 3 itself, not the damaged step 4."""
    out = tmp_path / "run"
    for step in (2, 4):
        committed(out, step, {TRAINER_STATE: b"{}", "weights.bin": b"w" * 100})
    overwrite(checkpoint(out, 4) / "weights.bin", 0, b"x")
    committed(out, 3, {TRAINER_STATE: b"{}", "weights.bin": b"w" * 100})
    prune(out, keep=1, saved_step=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [step_name(3), step_name(4)]
    assert newest_checkpoint(out) == checkpoint(out, 4)  # by sizes; the checksums tell it apart:
    assert problem_with(checkpoint(out, 4)) == "weights.bin does not match its checksum"


def test_a_save_clears_only_its_own_stale_staging(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".staging-step-00000001").mkdir(parents=True)
    (out / "checkpoints" / ".staging-notes").mkdir()
    save_on_ranks(out, 2, world_size=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".staging-notes", step_name(2)]


def test_verified_restore_without_candidate_is_a_fresh_start(tmp_path):
    assert verified_restore(None, tmp_path, object()) is None
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        resumable_checkpoint(tmp_path)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


@pytest.mark.slow
def test_two_fsdp_workers_skip_a_damaged_shard(tiny_llama, alpaca_file, tmp_path):
    """FSDP2 writes one shard per rank; one byte of rank 1's shard changes. Both workers pass over that
    checkpoint (rank 0 says so once) and the run continues from step 2 exactly as the uninterrupted one."""
    workers = ("--batch-size", "2", "--num-workers", "2", "--use-cpu", "--strategy", "fsdp")

    def cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zerotune", *run_args(tiny_llama, alpaca_file, out, *workers,
                                                                           *extra)], capture_output=True, text=True)

    reference = tmp_path / "reference"
    assert cli(reference).returncode == 0
    out = stopped_after(reference, tmp_path / "run", 4)
    shard = checkpoint(out, 4) / "fsdp" / "__1_0.distcp"
    flip_byte(shard, shard.stat().st_size // 2)
    resumed = cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "step-00000004" in line]
    assert said == ["zerotune: checkpoint step-00000004: fsdp/__1_0.distcp does not match its checksum; skipped, "
                    "resuming from step-00000002"], resumed.stderr[-3000:]
    assert losses_of(out) == losses_of(reference)
