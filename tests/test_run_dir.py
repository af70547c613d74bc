"""Output directories: zerotune deletes only what it wrote, one run at a time holds a directory, resume works as
schedulers restart jobs (relative paths, their own working directory), and an unwritable output fails first.

Every refusal is checked through the real CLI, with model loading made to fail the test: the error must come
before any weight loads, and every file of the user's must still be there afterwards.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import losses_of, preempt_after_three_steps, wait_for
from zerotune.cli import main
from zerotune.config import dump_yaml
from zerotune.run_dir import LOCK_FILE, MARKER, RunLock, check_owned, claim_output_dir, prepare_output_dir, \
    read_marker
from zerotune.errors import ConfigError, ZerotuneError


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    import zerotune.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output directory error was reported")

    monkeypatch.setattr(zerotune.model, "load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def train_args(model, data, out, *more, steps: int = 1) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--max-seq-len", "128", "--eval-fraction", "0", "--lr", "1e-2", "--seed", "0",
            "--tracking", "none", "--quiet", *map(str, more)]


def run_cli(capsys, *argv) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip()


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("zerotune: ")]
    assert len(lines) == 1 and lines[0].startswith("zerotune: error: "), err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def fake_run(directory: Path, config) -> Path:
    """What a training run leaves: its marker, config.yaml, metrics, adapter, a checkpoint and tokenizer files."""
    prepare_output_dir(directory, overwrite=False).release()
    (directory / "config.yaml").write_text(dump_yaml(config))
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_config.json").write_text("{}")
    (directory / "checkpoints" / "step-00000001").mkdir(parents=True)
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def project(alpaca_file, tmp_path):
    """A project folder: data, a model, a thesis. Nothing zerotune made."""
    folder = tmp_path / "project"
    (folder / "models" / "mine").mkdir(parents=True)
    (folder / "models" / "mine" / "weights.bin").write_bytes(b"\x01" * 64)
    shutil.copy(alpaca_file, folder / "data.jsonl")
    (folder / "thesis.tex").write_text("\\chapter{Years of work}")
    return folder


# ---- 1. nothing of the user's is ever deleted ----

@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
def test_a_folder_zerotune_did_not_make_is_refused_and_kept(overwrite, project, tiny_llama, capsys,
                                                            no_model_loading):
    before = snapshot(project)
    flags = ["--overwrite"] if overwrite else []
    status, err = run_cli(capsys, *train_args(tiny_llama, project / "data.jsonl", project, *flags))
    line = one_line_error(err)
    assert status == 2
    assert f"{project}: holds files zerotune did not create" in line and "pick an empty or new --output-dir" in line
    assert "pass --overwrite" not in line  # it would not help: never suggested for a folder that is not a run
    assert snapshot(project) == before


def test_overwrite_deletes_only_what_a_run_wrote(config_for, tmp_path, capsys):
    run = fake_run(tmp_path / "run", config_for())
    (run / "notes.txt").write_text("mine")
    (run / "plots").mkdir()
    (run / "plots" / "fig.pdf").write_bytes(b"%PDF")
    claim_output_dir(run, "train", overwrite=True).release()
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, LOCK_FILE, "notes.txt", "plots"])
    assert (run / "plots" / "fig.pdf").read_bytes() == b"%PDF"
    assert "left what it did not write there: notes.txt, plots" in capsys.readouterr().err
    assert read_marker(run)["kind"] == "train"


def test_overwrite_replaces_a_real_run_and_keeps_the_users_file(tiny_llama, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama, alpaca_file, out)) == 0
    marker = read_marker(out)
    assert marker["kind"] == "train" and marker["host"] == socket.gethostname() and marker["version"]
    (out / "notes.txt").write_text("mine")
    status, err = run_cli(capsys, *train_args(tiny_llama, alpaca_file, out))
    assert status == 2 and "already holds a zerotune training run; pass --overwrite to replace it, --resume" in err
    first = (out / "metrics.jsonl").read_text()
    assert main(train_args(tiny_llama, alpaca_file, out, "--overwrite", "--lr", "1e-3")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "metrics.jsonl").read_text() != first


def test_a_run_from_before_markers_is_recognised_conservatively(config_for, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text(dump_yaml(config_for()))
    with pytest.raises(ConfigError, match="holds files zerotune did not create"):
        check_owned(legacy, "train", overwrite=True)  # a config.yaml alone could be anyone's
    (legacy / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    check_owned(legacy, "train", overwrite=True)
    with pytest.raises(ConfigError, match="already holds a zerotune training run"):
        check_owned(legacy, "train", overwrite=False)
    (legacy / "config.yaml").write_text("model: {name: x}\n")  # not zerotune's sections
    with pytest.raises(ConfigError, match="holds files zerotune did not create"):
        check_owned(legacy, "train", overwrite=True)


@pytest.fixture
def adapter_dir(tiny_llama, tmp_path):
    """A LoRA adapter of the tiny model with nonzero weights (no training needed)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    directory = tmp_path / "adapter"
    model.save_pretrained(directory)
    return directory


def merge_args(tiny_llama, adapter, out, *more):
    return ["merge", "--model", str(tiny_llama), "--adapter", str(adapter), "--output-dir", str(out), *more]


def test_merge_never_replaces_a_training_run(config_for, adapter_dir, tiny_llama, tmp_path, capsys,
                                             no_model_loading):
    run = fake_run(tmp_path / "run", config_for())
    before = snapshot(run)
    status, err = run_cli(capsys, *merge_args(tiny_llama, adapter_dir, run, "--overwrite"))
    assert status == 2
    assert "holds a zerotune training run, not a model written by zerotune merge" in one_line_error(err)
    assert snapshot(run) == before


def test_merge_into_a_users_folder_is_refused(project, adapter_dir, tiny_llama, capsys, no_model_loading):
    before = snapshot(project)
    status, err = run_cli(capsys, *merge_args(tiny_llama, adapter_dir, project, "--overwrite"))
    assert status == 2 and "holds files zerotune did not create" in one_line_error(err)
    assert snapshot(project) == before


def test_merge_overwrite_replaces_only_an_earlier_merge(adapter_dir, tiny_llama, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(merge_args(tiny_llama, adapter_dir, out)) == 0
    assert read_marker(out)["kind"] == "merge" and (out / "model.safetensors").is_file()
    (out / "README.md").write_text("my model card")
    status, err = run_cli(capsys, *merge_args(tiny_llama, adapter_dir, out))
    assert status == 2 and "already holds a model written by zerotune merge; pass --overwrite" in err
    assert main(merge_args(tiny_llama, adapter_dir, out, "--overwrite")) == 0
    assert (out / "README.md").read_text() == "my model card" and (out / "model.safetensors").is_file()


def test_bench_never_deletes_a_directory_given_as_output_dir(project, tmp_path, capsys, no_model_loading):
    before = snapshot(project)
    status, err = run_cli(capsys, "bench", "w1", "--tiny", "--out-dir", tmp_path / "results",
                          f"output.dir={project}")
    assert status == 2 and "output.dir: bench decides these itself" in one_line_error(err)
    assert snapshot(project) == before
    status, err = run_cli(capsys, "bench", "w1", "--tiny", "--out-dir", tmp_path / "results", "--work-dir", project)
    assert status == 2 and "holds files zerotune did not create" in one_line_error(err) and "--work-dir" in err
    assert snapshot(project) == before


# ---- 2. one run at a time per directory ----

def test_a_held_directory_refuses_a_second_run_naming_the_holder(tiny_llama, alpaca_file, tmp_path, capsys,
                                                                 no_model_loading):
    out = tmp_path / "run"
    held = prepare_output_dir(out, overwrite=False)  # as a running `zerotune train` holds it
    try:
        status, err = run_cli(capsys, *train_args(tiny_llama, alpaca_file, out, "--overwrite"))
        with pytest.raises(ZerotuneError, match="another zerotune run is using"):
            RunLock(out)  # a second flock on its own open file fails even within one process
    finally:
        held.release()
    line = one_line_error(err)
    assert status == 2
    assert f"another zerotune run is using this directory (host {socket.gethostname()}, PID {os.getpid()})" in line
    RunLock(out).release()  # free again once the holder lets go


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_held_directory_names_the_holder_before_anything_else(tiny_llama, alpaca_file, tmp_path, capsys,
                                                                 no_model_loading, flag):
    """A run that has not written its first checkpoint yet: --resume is told the directory is in use (not
    that there is no checkpoint), as --overwrite is."""
    out = tmp_path / "run"
    held = prepare_output_dir(out, overwrite=False)
    try:
        status, err = run_cli(capsys, *train_args(tiny_llama, alpaca_file, out, flag))
    finally:
        held.release()
    assert status == 2 and "another zerotune run is using this directory" in one_line_error(err)


def test_a_stale_lock_file_blocks_nobody(tiny_llama, alpaca_file, tmp_path, capsys):
    """A killed run leaves its lock file; the kernel dropped its flock, so the next run goes ahead."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "gone-host", "pid": 999999}))
    assert main(train_args(tiny_llama, alpaca_file, out)) == 0
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and (out / "adapter").is_dir()


# ---- 3. resume as schedulers do it ----

def copy_job(tiny_llama, alpaca_file, root: Path) -> Path:
    """A job folder holding its model and data, addressed by relative paths from inside it."""
    job = root / "job"
    shutil.copytree(tiny_llama, job / "model")
    shutil.copy(alpaca_file, job / "data.jsonl")
    (job / "elsewhere").mkdir()
    return job


def test_resume_with_relative_paths_from_another_directory(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    job = copy_job(tiny_llama, alpaca_file, tmp_path)
    monkeypatch.chdir(job)
    assert main(train_args("model", "data.jsonl", "runs/r", "--save-steps", "1")) == 0
    # the same command plus --resume (two more steps), then from another directory by paths to the same files
    assert main(train_args("model", "data.jsonl", "runs/r", "--save-steps", "1", "--resume", steps=2)) == 0
    monkeypatch.chdir(job / "elsewhere")
    assert main(train_args("../model", "../data.jsonl", "../runs/r", "--save-steps", "1", "--resume", steps=3)) == 0
    events = [json.loads(line) for line in (job / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [event["step"] for event in events if "loss" in event] == [1, 2, 3]


def job_command(steps: int, *more: str, out: str = "runs/r") -> list[str]:
    """The job's command line, with paths relative to its working directory."""
    return [sys.executable, "-m", "zerotune", *train_args("model", "data.jsonl", out, "--save-steps", "2", *more,
                                                          steps=steps)]


def newest_step(out: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_sigterm_then_the_same_command_plus_resume_in_the_jobs_directory(tiny_llama, alpaca_file, tmp_path):
    """As Slurm or Kubernetes restart a preempted job: its own working directory, relative paths, SIGTERM, then
    the same command plus --resume. SIGTERM checkpoints mid-run and exits 75 naming --resume, with no final
    adapter; the resumed run finishes with the losses and adapter of an uninterrupted one, bit for bit (LoRA
    dropout on, so the restored RNG state counts). The one test of SIGTERM to a single-process run."""
    import torch

    from helpers import adapter_weights

    job, steps = copy_job(tiny_llama, alpaca_file, tmp_path), 16
    reference = job / "runs" / "reference"
    subprocess.run(job_command(steps, out="runs/reference"), cwd=job, check=True, capture_output=True)
    out = job / "runs" / "r"
    process = subprocess.Popen(job_command(steps), cwd=job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    preempt_after_three_steps(process, out, steps)
    resumed = subprocess.run(job_command(steps, "--resume"), cwd=job, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert losses_of(out) == losses_of(reference)
    resumed_adapter, expected = adapter_weights(out), adapter_weights(reference)
    assert all(torch.equal(resumed_adapter[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_running_job_holds_its_directory_until_killed(tiny_llama, alpaca_file, tmp_path):
    """A second run into a running job's directory fails at once naming host and PID, with --overwrite too and
    nothing deleted; once the job is SIGKILLed, its leftover lock file does not stop --resume."""
    job = copy_job(tiny_llama, alpaca_file, tmp_path)
    out = job / "runs" / "r"
    process = subprocess.Popen(job_command(100_000), cwd=job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")), process)
        for extra in (["--overwrite"], ["--resume"]):
            started = time.monotonic()
            second = subprocess.run(job_command(4, *extra), cwd=job, capture_output=True, text=True)
            assert second.returncode == 2, second.stderr
            assert (f"another zerotune run is using this directory (host {socket.gethostname()}, PID "
                    f"{process.pid})") in second.stderr
            assert "Loading weights" not in second.stderr and time.monotonic() - started < 60
            assert (out / "config.yaml").is_file() and process.poll() is None
    finally:
        process.kill()
        process.communicate()
    assert (out / LOCK_FILE).is_file()
    resumed = subprocess.run(job_command(newest_step(out) + 2, "--resume"), cwd=job, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ---- 4. an unwritable output fails first, in one line ----

def file_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only tmpfs (root ignores permission bits, so a chmod would not stop it); skipped where mount is
    not allowed."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(target)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("place", ["proc", "under_a_file", "read_only_mount"])
def test_unwritable_output_dir_fails_before_any_model_loads(place, tiny_llama, alpaca_file, tmp_path, capsys,
                                                            request, no_model_loading):
    out = {"proc": lambda: Path("/proc/zerotune-out"), "under_a_file": lambda: file_in_the_way(tmp_path),
           "read_only_mount": lambda: request.getfixturevalue("read_only_mount") / "out"}[place]()
    status, err = run_cli(capsys, *train_args(tiny_llama, alpaca_file, out))
    assert status == 2
    assert f"{out}: cannot write there" in one_line_error(err) and "--output-dir" in err


@pytest.mark.parametrize("place", ["proc", "under_a_file", "a_file", "read_only_mount"])
def test_merge_into_an_unwritable_place_is_one_line(place, adapter_dir, tiny_llama, tmp_path, capsys, request,
                                                    no_model_loading):
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    out = {"proc": lambda: Path("/proc/zerotune-merged"), "under_a_file": lambda: file_in_the_way(tmp_path),
           "a_file": lambda: a_file,
           "read_only_mount": lambda: request.getfixturevalue("read_only_mount") / "merged"}[place]()
    status, err = run_cli(capsys, *merge_args(tiny_llama, adapter_dir, out))
    assert status == 2
    line = one_line_error(err)
    assert str(out) in line and ("cannot write there" in line or "exists and is not a directory" in line)
