"""Tracking never takes training down: a dead, hanging or killed MLflow server and an unwritable default store
cost seconds and one line on stderr; metrics.jsonl stays complete and strict JSON; --require-tracking fails
fast instead; a signal ends every wait on MLflow."""

import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import train
from zerotune import mlflow_sink
from zerotune.config import build_config, dump_yaml
from zerotune.errors import ZerotuneError
from zerotune.stopping import StopSignals
from zerotune.strategies.process_group import free_port
from zerotune.tracking import Tracker, read_metrics

pytest.importorskip("mlflow")


def strict_lines(path: Path) -> list[dict]:
    """Each line parsed by a parser that refuses Infinity and NaN, as strict JSON readers do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def tracker_for(uri: str, out: Path, **settings) -> Tracker:
    config = build_config({"tracking.backend": "mlflow", "tracking.uri": uri, "output.dir": str(out), **settings})
    return Tracker(config, out, show_progress=False)


def uri_lines(stderr: str, uri: str) -> list[str]:
    return [line for line in stderr.splitlines() if uri in line]


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers (a hung server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def health_only_server():
    """Answers /health at once; every MLflow API call hangs until the test ends (a store stuck mid-request)."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                release.wait(60)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------- metrics.jsonl
def test_nonfinite_metrics_are_written_as_null(tmp_path):
    tracker = Tracker(build_config({"tracking.backend": "none", "output.dir": str(tmp_path)}), tmp_path,
                      show_progress=False)
    tracker.log(1, {"loss": 2.5, "lr": math.inf, "grad_norm": math.nan})
    tracker.log(2, {"loss": math.nan, "lr": 1e-3, "grad_norm": -math.inf})
    tracker.finish()
    events = strict_lines(tmp_path / "metrics.jsonl")
    assert [(e["loss"], e["lr"], e["grad_norm"]) for e in events] == [(2.5, None, None), (None, 1e-3, None)]
    assert (tmp_path / "loss.png").stat().st_size > 0  # the plot leaves the null loss out


def test_resume_rewrites_an_older_metrics_file_as_strict_json(tmp_path):
    """A file written before this fix holds `Infinity`; resuming keeps its lines up to the checkpoint, rewritten."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": Infinity}\n'
                                           '{"step": 2, "loss": NaN, "lr": 0.1}\n{"step": 3, "loss": 1.0}\n')
    Tracker(build_config({"tracking.backend": "none", "output.dir": str(tmp_path)}), tmp_path, show_progress=False,
            resume_step=2)
    assert strict_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0, "lr": None},
                                                        {"step": 2, "loss": None, "lr": 0.1}]


# ------------------------------------------------------------------------------------- start-up, in-process
def test_dead_port_is_one_line_within_seconds(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    tracker = tracker_for(uri, tmp_path)
    seconds = time.monotonic() - started
    assert seconds < 10, f"start-up took {seconds:.1f} s"
    assert tracker.run_id is None and tracker.mlflow is None
    tracker.log(1, {"loss": 1.0})
    tracker.finish()
    lines = uri_lines(capsys.readouterr().err, uri)
    assert len(lines) == 1 and "Connection refused" in lines[0], lines
    assert [e["loss"] for e in read_metrics(tmp_path / "metrics.jsonl")] == [1.0]


def test_hung_server_is_one_line_within_seconds(silent_server, tmp_path, capsys):
    started = time.monotonic()
    tracker = tracker_for(silent_server, tmp_path)
    assert time.monotonic() - started < 10
    assert tracker.mlflow is None
    lines = uri_lines(capsys.readouterr().err, silent_server)
    assert len(lines) == 1 and "no answer within" in lines[0], lines


def test_required_tracking_raises_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ZerotuneError) as caught:
        tracker_for(uri, tmp_path, **{"tracking.required": True})
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"tracking.required: MLflow at {uri} did not answer")
    assert "--require-tracking" in message


def test_a_store_that_never_opens_the_run_is_left_behind(health_only_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mlflow_sink, "START_SECONDS", 1.0)
    started = time.monotonic()
    tracker = tracker_for(health_only_server, tmp_path)
    assert time.monotonic() - started < 5
    assert tracker.mlflow is None
    lines = uri_lines(capsys.readouterr().err, health_only_server)
    assert len(lines) == 1 and "did not open a run within 1 s" in lines[0], lines


def test_a_signal_ends_the_start_up_wait(health_only_server, tmp_path, capsys):
    """SIGINT while MLflow hangs: the wait ends at once, and StopSignals still records the signal, so the loop
    checkpoints and stops after its first step as it would without MLflow."""
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with StopSignals() as signals:
        tracker = tracker_for(health_only_server, tmp_path)
    assert time.monotonic() - started < 5
    assert signals.requested == "SIGINT"
    assert tracker.mlflow is None
    lines = uri_lines(capsys.readouterr().err, health_only_server)
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], lines


def test_a_failing_call_is_one_line_and_mlflow_is_dropped(tmp_path, capsys, monkeypatch):
    """The run opened, then the store fails: one line, no further calls, training and finish() unaffected."""
    calls = []

    class FailingClient:
        def log_batch(self, run_id, metrics=()):
            calls.append(len(metrics))
            raise RuntimeError("API request failed (Caused by NewConnectionError: [Errno 111] Connection refused)")

        def set_terminated(self, run_id, status):
            calls.append(status)

    def open_run(sink, config, resume_run_id):
        sink.run_id = "run-1"
        return FailingClient()

    monkeypatch.setattr(mlflow_sink, "probe_store", lambda uri: None)
    monkeypatch.setattr(mlflow_sink.MlflowSink, "_open_run", open_run)
    uri = "http://127.0.0.1:1"
    tracker = tracker_for(uri, tmp_path)
    assert tracker.run_id == "run-1"
    for step in range(1, 6):
        tracker.log(step, {"loss": 1.0 / step})
        time.sleep(0.05)
    started = time.monotonic()
    tracker.finish()
    assert time.monotonic() - started < 5
    assert len(calls) == 1, calls  # the first failed batch; everything after it was dropped, the end too
    lines = uri_lines(capsys.readouterr().err, uri)
    assert lines == [f"zerotune: tracking: MLflow at {uri} failed (Connection refused); training goes on without "
                     "it (metrics.jsonl and loss.png keep every metric)"]
    assert [e["step"] for e in strict_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------- the CLI, end to end
def cli_run(config, tmp_path, *overrides, cwd=None, timeout=300):
    """`zerotune train CONFIG.yaml overrides...` as a user runs it; returns (process, seconds)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(config))
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "zerotune", "train", str(config_file), *overrides, "--quiet"]
    started = time.monotonic()
    process = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout)
    return process, time.monotonic() - started


@pytest.mark.slow
def test_cli_trains_through_a_dead_port(config_for, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    config = config_for()
    process, seconds = cli_run(config, tmp_path, "tracking.backend=mlflow", f"tracking.uri={uri}")
    assert process.returncode == 0, process.stderr[-3000:]
    assert len(uri_lines(process.stderr, uri)) == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert seconds < 120, f"{seconds:.0f} s (MLflow's retries alone took 254 s)"
    out = Path(config.output.dir)
    assert [e["step"] for e in strict_lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "loss.png").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_cli_require_tracking_fails_fast_in_one_line(config_for, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    config = config_for()
    process, seconds = cli_run(config, tmp_path, "tracking.backend=mlflow", f"tracking.uri={uri}",
                               "--require-tracking")
    assert process.returncode == 2, process.stderr[-3000:]
    assert uri_lines(process.stderr, uri) == [process.stderr.strip().splitlines()[-1]]
    assert process.stderr.strip().splitlines()[-1].startswith(f"zerotune: error: tracking.required: MLflow at {uri}")
    assert "Traceback" not in process.stderr
    assert seconds < 60
    assert not (Path(config.output.dir) / "adapter").exists()


@pytest.mark.slow
def test_cli_default_store_in_a_read_only_directory(config_for, tmp_path):
    """The default store is sqlite:///mlflow.db in the working directory. Root writes through chmod, so as root
    the working directory is /proc, which no one can create files in."""
    if os.geteuid() == 0:
        cwd = Path("/proc")
    else:
        cwd = tmp_path / "read-only"
        cwd.mkdir()
        cwd.chmod(0o555)
    config = config_for()
    process, seconds = cli_run(config, tmp_path, "tracking.backend=mlflow", cwd=cwd)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = uri_lines(process.stderr, f"sqlite:///{cwd / 'mlflow.db'}")
    assert len(lines) == 1 and "cannot write" in lines[0], process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert seconds < 120, f"{seconds:.0f} s (MLflow's SQLAlchemy retries alone took 111 s)"
    assert [e["step"] for e in strict_lines(Path(config.output.dir) / "metrics.jsonl")] == [1, 2, 3]


def start_mlflow_server(tmp_path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` in its own process group (it starts workers), answering /health."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return process, url
        except OSError:
            time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 120 s")


@pytest.mark.slow
def test_server_killed_mid_run(config_for, tmp_path):
    """The server dies after the run's first metrics reached it: training finishes with the losses of a run
    without tracking, metrics.jsonl complete, in bounded time, and says so in one line."""
    from mlflow.tracking import MlflowClient

    steps = 60
    reference = train(config_for(**{"train.max_steps": steps, "output.dir": str(tmp_path / "reference")}))
    server, url = start_mlflow_server(tmp_path)
    config = config_for(**{"train.max_steps": steps, "tracking.experiment": "killed"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_yaml(config))
    process = subprocess.Popen([sys.executable, "-m", "zerotune", "train", str(config_file), "tracking.backend=mlflow",
                                f"tracking.uri={url}", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    client = MlflowClient(tracking_uri=url)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no metric reached the server"
            experiment = client.get_experiment_by_name("killed")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                break
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    _, stderr = process.communicate(timeout=600)
    ended = time.time()
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert 1 <= len(uri_lines(stderr, url)) <= 2, stderr[-3000:]  # the failure, maybe a stall notice before it
    events = strict_lines(Path(config.output.dir) / "metrics.jsonl")
    assert [e["step"] for e in events] == list(range(1, steps + 1))
    assert [e["loss"] for e in events] == reference.losses
    # No step waited on MLflow (its client retries a dead server for 254 s; the old run stalled 509 s), and
    # saving, the plot and giving up on the server took seconds (a step here takes up to about a second).
    slowest = max(e["step_seconds"] for e in events)
    assert slowest < 30, f"a step took {slowest:.0f} s"
    assert ended - events[-1]["time"] < 60, f"{ended - events[-1]['time']:.0f} s from the last step to the exit"
