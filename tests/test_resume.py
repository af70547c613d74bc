"""Checkpoints and resume: a resumed run reproduces the uninterrupted one.

Tolerances: on one process and on the same worker count, fp32 CPU resume is bit-exact (losses and adapter
compared with ==). On another worker count the gradient summation order changes: 1e-5 relative.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_config
from helpers import ListeningSockets, adapter_weights, losses_of, train, wait_for  # noqa: F401 (re-exported)
from zerotune.checkpoints import check_resumable, complete_checkpoints, newest_checkpoint, step_name
from zerotune.checkpoints.manifest import TRAINER_STATE
from zerotune.checkpoints.save import commit
from zerotune.cli import main
from zerotune.config import dump_yaml
from zerotune.errors import ConfigError
from zerotune.stopping import EXIT_PREEMPTED

# 39 of the 48 records fit max_seq_len 128: a global batch of 8 gives 4 steps per epoch.
SINGLE = {"train.max_steps": 9, "train.grad_accum": 2, "checkpoint.save_steps": 2, "checkpoint.keep": 4,
          "adapter.dropout": 0.1}


def interrupted_copy(source: Path, target: Path, step: int) -> Path:
    """The run directory as an interruption right after checkpoint ``step`` leaves it."""
    shutil.copytree(source, target)
    for checkpoint in (target / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    for final in ("adapter", "model", "loss.png"):
        path = target / final
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, alpaca_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return out, train(make_config(tiny_llama, alpaca_file, out, **SINGLE))


def test_checkpoint_contents(uninterrupted):
    out, result = uninterrupted
    assert [p.name for p in complete_checkpoints(out)] == [step_name(s) for s in (2, 4, 6, 8)]
    state = json.loads((out / "checkpoints" / step_name(6) / TRAINER_STATE).read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"], state["examples_seen"]) == (6, 1, 2, 48)
    assert state["losses"] == result.losses[:6]
    files = {p.name for p in (out / "checkpoints" / step_name(6)).iterdir()}
    assert {"manifest.json", "trainer_state.json", "rng-rank-0.pt", "trainable.safetensors", "optimizer.pt"} <= files


@pytest.mark.parametrize("step", [2, 4], ids=["mid_epoch", "epoch_boundary"])
def test_resume_is_exact(step, uninterrupted, tiny_llama, alpaca_file, tmp_path):
    """Grad accumulation 2, LoRA dropout 0.1 (so the RNG state matters), resumed mid-epoch and at an epoch end."""
    out, expected = uninterrupted
    run_dir = interrupted_copy(out, tmp_path / "run", step)
    result = train(make_config(tiny_llama, alpaca_file, run_dir, **SINGLE, **{"checkpoint.resume": True}))
    assert result.resumed_from == step
    assert result.losses == expected.losses  # bit-exact, the restored history and the new steps alike
    resumed, reference = adapter_weights(run_dir), adapter_weights(out)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 10)), "metrics.jsonl continues without gaps or repeats"
    assert (run_dir / "loss.png").is_file()


TWO_WORKERS = {"train.max_steps": 4, "train.batch_size": 2, "train.grad_accum": 2, "checkpoint.save_steps": 2,
               "distributed.num_workers": 2, "distributed.use_cpu": True, "adapter.dropout": 0.1}
ENGINES = {
    "ddp": {"distributed.strategy": "ddp"},
    # FSDP2 without dropout: its uninterrupted run also serves test_fsdp_checkpoint_resumes_on_one_worker, where
    # RNG streams cannot carry over to another worker count. Each rank's RNG state is saved and restored the same
    # way under every engine (checkpoints.save.capture_rng, resume.restore_rng): DDP and ZeRO-3 here and the
    # single-process tests above resume it with dropout 0.1.
    "fsdp": {"distributed.strategy": "fsdp", "adapter.dropout": 0.0},
    "zero3": {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3},
}


@pytest.fixture(scope="module")
def uninterrupted_two_workers(tiny_llama, alpaca_file, tmp_path_factory):
    """engine -> (run directory, result) of its uninterrupted 2-worker run, each launched once per module."""
    runs = {}

    def run(engine: str):
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{engine}") / "run"
            runs[engine] = out, train(make_config(tiny_llama, alpaca_file, out, **{**TWO_WORKERS, **ENGINES[engine]}))
        return runs[engine]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_two_workers_is_exact(engine, uninterrupted_two_workers, tiny_llama, alpaca_file, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    full, expected = uninterrupted_two_workers(engine)
    run_dir = interrupted_copy(full, tmp_path / "resumed", 2)
    result = train(make_config(tiny_llama, alpaca_file, run_dir, **{**TWO_WORKERS, **ENGINES[engine],
                                                                   "checkpoint.resume": True}))
    assert result.resumed_from == 2 and result.losses == expected.losses
    resumed, reference = adapter_weights(run_dir), adapter_weights(full)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_worker(uninterrupted_two_workers, tiny_llama, alpaca_file, tmp_path):
    """FSDP2 shards are resharded by torch.distributed.checkpoint: 2 workers save, 1 worker resumes
    (the same global batch of 8). Dropout is off: RNG streams cannot carry over to another worker count."""
    full, expected = uninterrupted_two_workers("fsdp")
    run_dir = interrupted_copy(full, tmp_path / "resumed", 2)
    one = {**TWO_WORKERS, **ENGINES["fsdp"], "distributed.num_workers": 1, "train.grad_accum": 4,
           "checkpoint.resume": True}
    result = train(make_config(tiny_llama, alpaca_file, run_dir, **one))
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected.losses), rtol=1e-5, atol=0)
    resumed, reference = adapter_weights(run_dir), adapter_weights(full)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-6)


def fake_checkpoint(output_dir: Path, config, step: int, **state) -> Path:
    """A committed checkpoint holding only the trainer state (enough for the pre-launch checks)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_yaml(config))
    staging = output_dir / "checkpoints" / f".staging-{step_name(step)}"
    staging.mkdir(parents=True)
    defaults = {"step": step, "global_batch_size": 4, "format": "replicated", "world_size": 1,
                "strategy": "single", "train_examples": 39}
    (staging / TRAINER_STATE).write_text(json.dumps({**defaults, **state}))
    final = output_dir / "checkpoints" / step_name(step)
    commit(staging, final, step)
    return final


def test_resume_refuses_a_changed_config(config_for, tmp_path, tiny_llama_pad_eos):
    fake_checkpoint(tmp_path / "run", config_for(), 2)
    changed = config_for(**{"model.name": str(tiny_llama_pad_eos), "checkpoint.resume": True})
    with pytest.raises(ConfigError, match=r"model\.name was .* now .*start a new --output-dir"):
        check_resumable(changed, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"adapter\.r was 16 .*, now 8"):
        check_resumable(config_for(**{"adapter.r": 8, "checkpoint.resume": True}), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"global batch was 4 examples, now 8"):
        check_resumable(config_for(**{"train.grad_accum": 2, "checkpoint.resume": True}), tmp_path / "run")
    # What may change: the step count, the learning rate, logging.
    assert check_resumable(config_for(**{"train.max_steps": 10, "train.lr": 1e-3, "checkpoint.resume": True}),
                           tmp_path / "run").name == step_name(2)


def test_deepspeed_checkpoint_needs_its_worker_count(config_for, tmp_path):
    fake_checkpoint(tmp_path / "run", config_for(), 2, format="deepspeed", world_size=2, global_batch_size=4,
                    strategy="deepspeed")
    config = config_for(**{"checkpoint.resume": True, "train.batch_size": 2, "train.grad_accum": 1,
                           "distributed.num_workers": 2})
    assert check_resumable(config, tmp_path / "run")
    one = config_for(**{"checkpoint.resume": True, "train.batch_size": 2, "train.grad_accum": 2})
    with pytest.raises(ConfigError, match="DeepSpeed does not reshard; use --num-workers 2"):
        check_resumable(one, tmp_path / "run")


def test_resume_cli_errors(tiny_llama, alpaca_file, tmp_path, capsys):
    args = ["train", "--model", str(tiny_llama), "--data", str(alpaca_file), "--tracking", "none"]
    assert main([*args, "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no complete checkpoint to resume from" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(tmp_path / "x"), "--resume", "--overwrite"]) == 2
    assert "pick one" in capsys.readouterr().err


def test_incomplete_checkpoints_are_never_used(config_for, tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, config_for(), 2)
    newer = fake_checkpoint(out, config_for(), 4)
    (newer / TRAINER_STATE).write_text("{}")  # no longer the size its manifest recorded: a torn copy
    (out / "checkpoints" / f".staging-{step_name(6)}").mkdir()  # a save that never committed
    assert newest_checkpoint(out).name == step_name(2)


# ---- real interruptions, through the command line in a child process ----

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zerotune", "train", *map(str, args)]


def run_args(tiny_llama, alpaca_file, out, steps):
    return ["--model", tiny_llama, "--data", alpaca_file, "--output-dir", out, "--max-steps", steps,
            "--batch-size", "4", "--dtype", "fp32", "--max-seq-len", "128", "--eval-fraction", "0", "--lr", "1e-2",
            "--seed", "0", "--tracking", "none", "--quiet", "--save-steps", "2"]


# SIGTERM to a single-process run, its checkpoint and the resumed run's exact losses and adapter: tested once, as
# a preempted job is restarted (test_sigterm_then_the_same_command_plus_resume_in_the_jobs_directory in
# tests/test_run_dir.py).


SLOW_COMMIT = """
import sys, time
import zerotune.checkpoints.save as checkpoint_save
original = checkpoint_save.commit
def slow_commit(staging, final, step, *rest):
    if step >= 4:
        time.sleep(600)  # the test kills the process here, inside the save of step 4
    original(staging, final, step, *rest)
checkpoint_save.commit = slow_commit
from zerotune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tiny_llama, alpaca_file, tmp_path):
    out = tmp_path / "run"
    args = ["train", *map(str, run_args(tiny_llama, alpaca_file, out, 8))]
    process = subprocess.Popen([sys.executable, "-c", SLOW_COMMIT, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    staging = out / "checkpoints" / f".staging-{step_name(4)}"
    wait_for(lambda: (staging / "trainable.safetensors").is_file(), process)
    process.kill()
    process.wait()
    assert newest_checkpoint(out).name == step_name(2)
    result = subprocess.run(cli(*run_args(tiny_llama, alpaca_file, out, 8), "--resume"), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert not staging.exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(out)] == [step_name(6), step_name(8)]  # keep 2


# ---- non-finite loss guard ----

@pytest.fixture(scope="module")
def nan_llama(tiny_llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    out = tmp_path_factory.mktemp("models") / "nan_llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def test_nonfinite_loss_stops_naming_the_step(nan_llama, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--model", str(nan_llama), "--data", str(alpaca_file), "--output-dir", str(out),
                   "--max-steps", "3", "--save-steps", "1", "--tracking", "none", "--quiet", "--dtype", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and err.startswith("zerotune: error: step 1: loss nan") and "--on-nonfinite skip" in err
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


def test_nonfinite_skip_drops_the_step(config_for, monkeypatch):
    import zerotune.step as loop

    real, calls = loop.token_loss_sum, []

    def nan_on_second_step(model, batch, head=None, label_count=None):
        loss_sum, tokens = real(model, batch, head, label_count)
        calls.append(1)
        return (loss_sum * float("nan") if len(calls) == 2 else loss_sum), tokens

    monkeypatch.setattr(loop, "token_loss_sum", nan_on_second_step)
    result = train(config_for(**{"train.on_nonfinite": "skip", "train.max_steps": 4}))
    assert result.skipped_steps == 1
    assert torch.isnan(torch.tensor(result.losses[1])) and all(map(torch.isfinite, torch.tensor(result.losses)[[0, 2, 3]]))
    assert all(torch.isfinite(t).all() for t in adapter_weights(result.output_dir).values())


def test_nonfinite_skip_gives_up_after_max_skipped(nan_llama, alpaca_file, tmp_path):
    config = make_config(nan_llama, alpaca_file, tmp_path / "run", **{"train.on_nonfinite": "skip",
                                                                    "train.max_skipped_steps": 2})
    with pytest.raises(loop_error(), match=r"step 2: 2 steps had a non-finite loss"):
        train(config)


def loop_error():
    from zerotune.train import NonFiniteError

    return NonFiniteError


# ---- worker failures: the launcher restarts the workers, which resume from the newest checkpoint ----

def kill_one_worker(parent_pid: int, marker: str) -> int:
    import os

    import psutil

    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                os.kill(child.pid, signal.SIGKILL)
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker process matching {marker!r}")


KILL_STEPS = 16


@pytest.fixture(scope="module")
def kill_reference(tiny_llama, alpaca_file, tmp_path_factory) -> Path:
    """The uninterrupted single-process run both launchers' worker-kill tests are compared with (run once)."""
    reference = tmp_path_factory.mktemp("kill-reference") / "run"
    # No LoRA dropout: one process and two workers draw different random numbers.
    subprocess.run(cli(*run_args(tiny_llama, alpaca_file, reference, KILL_STEPS), "--grad-accum", "2",
                       "--lora-dropout", "0"), check=True, capture_output=True)
    return reference


def kill_a_worker(tiny_llama, alpaca_file, out, launcher_args, marker):
    """A 2-worker run through the CLI that loses a worker once checkpoint 4 exists, its listening sockets watched
    throughout: (exit status, stdout and stderr, the sockets)."""
    process = subprocess.Popen(cli(*run_args(tiny_llama, alpaca_file, out, KILL_STEPS), "--batch-size", "2",
                                   "--grad-accum", "2", "--num-workers", "2", "--use-cpu", "--lora-dropout", "0",
                                   *launcher_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ListeningSockets(process.pid) as sockets:
        # Once checkpoint 4 exists, checkpoint 2 has surely been reported to the launcher (Ray's report follows
        # our commit): the restart must resume from 2 or 4, not start over.
        wait_for(lambda: (out / "checkpoints" / step_name(4)).is_dir(), process, timeout=300)
        kill_one_worker(process.pid, marker)
        out_text, err = process.communicate(timeout=600)
    return process.returncode, out_text + err, sockets


def assert_survived(out: Path, reference: Path, status: int, output: str) -> None:
    """The restarted workers resumed, and the whole run equals the uninterrupted single-process reference."""
    assert status == 0, output[-3000:]
    assert "resumed from" in output
    torch.testing.assert_close(torch.tensor(losses_of(out)), torch.tensor(losses_of(reference)), rtol=1e-5, atol=0)
    resumed, expected = adapter_weights(out), adapter_weights(reference)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_local_launcher_restarts_after_a_worker_dies(kill_reference, tiny_llama, alpaca_file, tmp_path):
    status, output, _ = kill_a_worker(tiny_llama, alpaca_file, tmp_path / "run",
                                      ["--strategy", "ddp", "--max-restarts", "1"], "spawn_main")
    assert_survived(tmp_path / "run", kill_reference, status, output)


@pytest.fixture(scope="module")
def ray_worker_killed(tiny_llama, alpaca_file, tmp_path_factory):
    """2 FSDP2 workers on a local Ray through the CLI, one killed after checkpoint 4: (output directory, exit
    status, output, sockets) for the two tests below, one Ray run for both."""
    pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("ray-kill") / "run"
    return (out, *kill_a_worker(tiny_llama, alpaca_file, out,
                                ["--launcher", "ray", "--strategy", "fsdp", "--max-failures", "1"], "RayTrainWorker"))


@pytest.mark.slow
def test_ray_restarts_after_a_worker_dies(ray_worker_killed, kill_reference):
    """Ray restarts the workers, which resume from the newest checkpoint; the run's losses and adapter equal one
    process's. This is also the suite's comparison of a Ray run with one process (tests/test_ray.py runs the
    tutorial's line on a two-node cluster)."""
    out, status, output, _ = ray_worker_killed
    assert_survived(out, kill_reference, status, output)


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(ray_worker_killed):
    """Every listening socket of a local Ray run's processes (GCS, raylet, agents, workers, the restarted ones
    too) is on loopback (tests/test_network_exposure.py says why), watched on the run above."""
    *_, sockets = ray_worker_killed
    owners = " | ".join(sockets.owners())
    for component in ("gcs_server", "raylet", "RayTrainWorker"):
        assert component in owners, f"no listening socket of {component} seen: {owners[:2000]}"
    assert sockets.exposed() == []


def test_time_based_checkpoints(config_for):
    result = train(config_for(**{"checkpoint.save_minutes": 1e-6, "train.max_steps": 3, "checkpoint.keep": 5}))
    assert [p.name for p in complete_checkpoints(result.output_dir)] == [step_name(s) for s in (1, 2, 3)]


def test_resume_continues_the_same_mlflow_run(uninterrupted, tiny_llama, alpaca_file, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**SINGLE, "tracking.backend": "mlflow", "tracking.uri": uri, "train.max_steps": 4}
    first = train(make_config(tiny_llama, alpaca_file, tmp_path / "run", **settings))
    run_dir = interrupted_copy(tmp_path / "run", tmp_path / "resumed", 2)
    # The copy shares the first run's MLflow run id, as an interrupted run would.
    resumed = train(make_config(tiny_llama, alpaca_file, run_dir, **settings, **{"checkpoint.resume": True}))
    assert resumed.mlflow_run_id == first.mlflow_run_id
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(first.mlflow_run_id, "loss")
    # Steps 3 and 4 appear twice only because this test resumes a run that had already finished them.
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4]
    assert mlflow.tracking.MlflowClient(uri).get_run(first.mlflow_run_id).info.status == "FINISHED"


@pytest.fixture(scope="module")
def local_workers_stopped(tiny_llama, alpaca_file, tmp_path_factory):
    """Two local DDP workers through the CLI, SIGTERMed once 3 steps are logged, their listening sockets watched
    meanwhile: (command-line arguments, output directory, exit status, stderr, sockets) for the two tests below."""
    out = tmp_path_factory.mktemp("local-sigterm") / "run"
    args = [*run_args(tiny_llama, alpaca_file, out, 40), "--batch-size", "2", "--num-workers", "2", "--use-cpu",
            "--strategy", "ddp", "--save-steps", "100"]
    process = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ListeningSockets(process.pid) as sockets:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(losses_of(out)) >= 3, process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    return args, out, process.returncode, err, sockets


@pytest.mark.slow
def test_sigterm_reaches_local_workers(local_workers_stopped):
    """Two local workers: SIGTERM to the launching process goes through torch's elastic agent to the workers,
    which finish the step, checkpoint and leave; the job exits 75, and --resume completes it."""
    args, out, status, err, _ = local_workers_stopped
    assert status == EXIT_PREEMPTED, err[-2000:]
    stopped_at = json.loads((newest_checkpoint(out) / TRAINER_STATE).read_text())["step"]
    assert 3 <= stopped_at < 40
    finished = subprocess.run(cli(*args, "--resume"), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 41))


@pytest.mark.slow
def test_local_launcher_listens_on_loopback_only(local_workers_stopped):
    """The local launcher's processes (this one, torch's elastic agent, the workers) listen on loopback only
    (tests/test_network_exposure.py says why), watched on the run above rather than on a run of its own."""
    *_, sockets = local_workers_stopped
    # The watch saw the run: both workers' gloo sockets and rank 0's store.
    assert len(sockets.seen) >= 3 and len({pid for pid, _, _ in sockets.seen}) >= 2, sockets.seen
    assert sockets.exposed() == []
