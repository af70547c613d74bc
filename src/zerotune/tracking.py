"""Metrics: metrics.jsonl always, MLflow when enabled, a progress bar, and loss.png at the end.

Only rank 0 creates a Tracker; other ranks get NullTracker, so a job makes exactly one MLflow run.

MLflow never takes training down: its calls run on one background thread (MlflowSink), start-up first probes
the store with a short timeout, and any failure is one line on stderr, after which training goes on with
metrics.jsonl and loss.png only (unless tracking.required asked for MLflow, which then stops the run at start).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from zerotune.config import RunConfig

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"

PROBE_SECONDS = 5.0  # start-up: how long the store may take to answer a first request
START_SECONDS = 30.0  # start-up: how long a store that answered may take to open the run
STALL_SECONDS = 30.0  # mid-run: a call in flight this long gets its one line
STOP_SECONDS = 10.0  # a run that ends KILLED or FAILED waits at most this long for MLflow
QUEUED_EVENTS = 10_000  # metric events waiting for MLflow beyond this are dropped (metrics.jsonl has them)
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class NullTracker:
    """What non-zero ranks use: every call does nothing."""

    run_id: str | None = None

    def start(self, total_steps: int, initial_step: int = 0) -> None: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def note(self, message: str) -> None: ...
    def log_artifacts(self, paths: list[Path]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    def __init__(self, config: RunConfig, output_dir: Path, show_progress: bool = True,
                 resume_step: int | None = None, resume_run_id: str | None = None):
        """``resume_step``: continuing from a checkpoint at that step. Events logged after it (by the run that
        was interrupted) are dropped from metrics.jsonl, and the MLflow run ``resume_run_id`` continues."""
        self.output_dir = output_dir
        self.config = config
        self.show_progress = show_progress
        self.metrics_path = output_dir / METRICS_FILE
        self.progress = None
        self.mlflow: MlflowSink | None = None
        self.run_id = resume_run_id  # kept when MLflow is down, so a later resume still continues that run
        if resume_step is not None and self.metrics_path.is_file():
            kept = [e for e in read_metrics(self.metrics_path) if e.get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(strict_json(e) + "\n" for e in kept))
        if config.tracking.backend == "mlflow":
            self.mlflow = start_mlflow(config, resume_run_id, self.warn)
            if self.mlflow is not None:
                self.run_id = self.mlflow.run_id

    def start(self, total_steps: int, initial_step: int = 0) -> None:
        if self.show_progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        event = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(strict_json(event) + "\n")
        if self.mlflow is not None:
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.mlflow.log_metrics(step, finite)
        if self.progress is not None:
            if "loss" in metrics:
                self.progress.n = step
                self.progress.set_postfix(
                    loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}",
                    tok_s=f"{metrics.get('tokens_per_second', 0):,.0f}", refresh=False,
                )
                self.progress.refresh()
            if "eval_loss" in metrics:  # perplexity for SFT, preference accuracy for pairs
                detail = (f"perplexity {metrics['eval_perplexity']:.2f}" if "eval_perplexity" in metrics else
                          f"accuracy {metrics.get('eval_rewards/accuracies', math.nan):.3f}")
                self.progress.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f}  {detail}")

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """One line on stderr (MLflow's thread calls this too; tqdm.write keeps the bar intact)."""
        if self.progress is not None:
            self.progress.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def log_artifacts(self, paths: list[Path]) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifacts(paths)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the bar, draw loss.png, end the MLflow run (FINISHED, KILLED when preempted, FAILED)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        plot_losses(self.metrics_path, self.output_dir / LOSS_PLOT)
        if self.mlflow is not None:
            self.mlflow.log_artifacts([self.output_dir / LOSS_PLOT])
            self.mlflow.close(status)
            self.mlflow = None


def strict_json(event: dict[str, Any]) -> str:
    """One metrics.jsonl line that any JSON parser reads: a non-finite number (an infinite learning rate, a NaN
    loss) is written as null, since JSON has no Infinity or NaN."""
    safe = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in event.items()}
    return json.dumps(safe, allow_nan=False)


def start_mlflow(config: RunConfig, resume_run_id: str | None, warn: Callable[[str], None]) -> "MlflowSink | None":
    """The run's MLflow sink, its run opened (or ``resume_run_id`` continued); None when the store does not
    answer, after one line through ``warn``. With tracking.required that is a ZerotuneError instead."""
    try:
        import mlflow
    except ImportError:
        from zerotune.errors import ConfigError

        raise ConfigError("tracking.backend mlflow needs mlflow: pip install mlflow, or pass --tracking none") from None
    uri = config.tracking.uri or mlflow.get_tracking_uri()
    problem = probe_store(uri)
    sink = None
    if problem is None:
        sink = MlflowSink(uri, warn)
        problem = sink.open(config, resume_run_id)
    if problem is None:
        return sink
    if config.tracking.required:
        from zerotune.errors import ZerotuneError

        raise ZerotuneError(f"tracking.required: MLflow at {uri} {problem}; start it, fix --tracking-uri, or drop "
                            "--require-tracking to train with metrics.jsonl and loss.png only")
    warn(f"zerotune: tracking: MLflow at {uri} {problem}; training goes on without it (metrics.jsonl and loss.png "
         "keep every metric)")
    return None


def probe_store(uri: str) -> str | None:
    """What stops a tracking store from being used, found within PROBE_SECONDS; None when it answered or cannot
    be probed. HTTP: any answer counts (a 404 from a server without /health too). SQLite: the file must be
    writable. Other databases: a TCP connection. MLflow's own client would retry a dead store for minutes."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    try:
        if scheme in ("http", "https"):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
            except urllib.error.HTTPError:
                pass  # it answered
            except urllib.error.URLError as error:
                if not isinstance(error.reason, ssl.SSLError):  # TLS trouble is MLflow's client's to judge
                    raise
        elif scheme == "sqlite":
            return _probe_sqlite(uri[len("sqlite:///"):])
        elif scheme in DATABASE_PORTS and parts.hostname:
            import socket

            socket.create_connection((parts.hostname, parts.port or DATABASE_PORTS[scheme]), PROBE_SECONDS).close()
    except (OSError, ValueError) as error:
        return f"did not answer ({_reason(error)})"
    return None


def _is_remote(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme.split("+")[0] in ("http", "https", *DATABASE_PORTS)


def _probe_sqlite(path: str) -> str | None:
    import sqlite3

    try:
        connection = sqlite3.connect(path, timeout=PROBE_SECONDS)
        try:
            connection.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as error:
        return f"cannot write its store {path} ({error})"
    return None


def _reason(error: BaseException) -> str:
    """A short why: 'Connection refused', 'no answer within 5 s', an exception's first line."""
    error = getattr(error, "reason", error)
    if isinstance(error, TimeoutError):
        return f"no answer within {PROBE_SECONDS:.0f} s"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)  # what MLflow's client wraps three levels deep
    if errno:
        return errno.group(1)
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


class MlflowSink:
    """MLflow on one background thread. Training only queues work here; the thread opens the run, logs metrics
    in batches, uploads artifacts and ends the run. Its first failure is one line, and then it drops the rest
    (MLflow's own client retries a call first: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)."""

    def __init__(self, uri: str, warn: Callable[[str], None]):
        self.uri = uri
        self.warn = warn
        self.run_id: str | None = None
        self.failure: str | None = None  # set once: from then on everything queued is dropped
        self.abandoned = False  # training stopped waiting: the thread drops what is left and ends
        self.queue: queue.Queue = queue.Queue()
        self.opened = threading.Event()
        self.ended = threading.Event()
        self.call_started: float | None = None  # monotonic start of the call in flight, None between calls
        self.reported: set[str] = set()
        self.held = None  # an item taken from the queue while batching metrics

    def open(self, config: RunConfig, resume_run_id: str | None) -> str | None:
        """Start the thread and wait (START_SECONDS at most, a signal ends it) until the run is open."""
        threading.Thread(target=self._work, args=(config, resume_run_id), name="zerotune-mlflow",
                         daemon=True).start()
        with signal_watch() as interrupted:
            deadline = time.monotonic() + START_SECONDS
            while not self.opened.wait(0.1):
                if interrupted() or time.monotonic() > deadline:
                    self.abandoned = True
                    return ("start-up was interrupted by " + interrupted() if interrupted() else
                            f"did not open a run within {START_SECONDS:.0f} s")
        return f"failed ({self.failure})" if self.failure else None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.failure or self.abandoned:
            return
        self._check_stall()
        if self.queue.qsize() >= QUEUED_EVENTS:
            self._report("queue", f"zerotune: tracking: MLflow at {self.uri} is {QUEUED_EVENTS} events behind; "
                                  "newer metrics are not sent to it (metrics.jsonl keeps them)")
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.queue.put(("metrics", [Metric(key, value, now, step) for key, value in metrics.items()]))

    def log_artifacts(self, paths: list[Path]) -> None:
        if not (self.failure or self.abandoned):
            self.queue.put(("artifacts", list(paths)))

    def close(self, status: str) -> None:
        """End the run and wait for the queue: while the store answers a probe when the run FINISHED (uploads
        may be large), STOP_SECONDS at most otherwise; a signal ends the wait."""
        if self.failure or self.abandoned:
            return
        self.queue.put(("end", status))
        deadline = time.monotonic() + (STOP_SECONDS if status != "FINISHED" else math.inf)
        next_probe = time.monotonic()  # a call already stuck is probed at once
        with signal_watch() as interrupted:
            while not self.ended.wait(0.1):
                if self.failure:
                    return
                why = ("interrupted by " + interrupted() if interrupted() else
                       f"did not finish within {STOP_SECONDS:.0f} s" if time.monotonic() > deadline else None)
                if (why is None and _is_remote(self.uri) and self._in_call_for() > PROBE_SECONDS
                        and time.monotonic() >= next_probe):
                    why = probe_store(self.uri)  # a slow upload to a live server goes on
                    next_probe = time.monotonic() + PROBE_SECONDS
                if why:
                    self.abandoned = True
                    self._report("failed", f"zerotune: tracking: MLflow at {self.uri} {why}; its run {self.run_id} "
                                           "misses what was still queued (metrics.jsonl and loss.png have it all)")
                    return

    # ----------------------------------------------------------------------------------- the thread
    def _work(self, config: RunConfig, resume_run_id: str | None) -> None:
        try:
            client = self._call(self._open_run, config, resume_run_id)
        except Exception as error:  # noqa: BLE001 - any failure of the store is reported, never raised
            self.failure = _reason(error)
            self.opened.set()
            return
        self.opened.set()
        if self.abandoned:  # training went on without this run; say it ended
            with contextlib.suppress(Exception):
                client.set_terminated(self.run_id, "KILLED")
            return
        while True:
            kind, payload = self._next()
            if self.failure or self.abandoned:
                if kind == "end":
                    break
                continue
            try:
                self._call(self._handle, client, kind, payload)
            except Exception as error:  # noqa: BLE001
                self.failure = _reason(error)
                self._report("failed", f"zerotune: tracking: MLflow at {self.uri} failed ({self.failure}); "
                                       "training goes on without it (metrics.jsonl and loss.png keep every metric)")
            if kind == "end":
                break
        self.ended.set()

    def _open_run(self, config: RunConfig, resume_run_id: str | None):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:  # one job, one MLflow run, across resumes
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
            return client
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else self._create_experiment(client, config)
        run = client.create_run(experiment_id, run_name=Path(config.output.dir).name, tags=_context_tags())
        from mlflow.entities import Param

        params = []
        for section, values in config.to_dict().items():
            for key, value in values.items():
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                params.append(Param(f"{section}.{key}", text))
        client.log_batch(run.info.run_id, params=params)
        self.run_id = run.info.run_id
        return client

    def _create_experiment(self, client, config: RunConfig) -> str:
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            # Keep artifacts next to the store, not in whichever directory a worker happens to run.
            artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
        try:
            return client.create_experiment(config.tracking.experiment, artifact_location=artifacts)
        except Exception:  # noqa: BLE001 - another job created it first
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _handle(self, client, kind: str, payload) -> None:
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=payload)
        elif kind == "artifacts":
            for path in payload:
                if path.is_dir():
                    client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                elif path.is_file():
                    client.log_artifact(self.run_id, str(path))
        else:
            client.set_terminated(self.run_id, payload)

    def _next(self) -> tuple[str, Any]:
        """The next piece of work; consecutive metric events become one batch (MLflow takes 1000 a call)."""
        item, self.held = self.held or self.queue.get(), None
        if item[0] != "metrics":
            return item
        metrics = list(item[1])
        while len(metrics) < 900:
            try:
                following = self.queue.get_nowait()
            except queue.Empty:
                break
            if following[0] != "metrics":
                self.held = following
                break
            metrics += following[1]
        return "metrics", metrics

    def _call(self, function, *args):
        self.call_started = time.monotonic()
        try:
            return function(*args)
        finally:
            self.call_started = None

    def _in_call_for(self) -> float:
        started = self.call_started
        return 0.0 if started is None else time.monotonic() - started

    def _check_stall(self) -> None:
        if self._in_call_for() > STALL_SECONDS:
            self._report("stall", f"zerotune: tracking: MLflow at {self.uri} has not answered for "
                                  f"{STALL_SECONDS:.0f} s (its client retries); training goes on, metrics wait in "
                                  "a queue and metrics.jsonl has them all")

    def _report(self, kind: str, message: str) -> None:
        if kind not in self.reported and not ("failed" in self.reported and kind != "failed"):
            self.reported.add(kind)
            self.warn(message)


def _context_tags() -> dict[str, str]:
    """The tags mlflow.start_run would add (user, source, git commit)."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags()
    except Exception:  # noqa: BLE001 - tags are a nicety
        return {}


@contextlib.contextmanager
def signal_watch():
    """While the main thread waits on MLflow: SIGINT and SIGTERM end the wait (yields a function that names the
    signal once one came) and still reach the handler installed before, e.g. zerotune.stopping.StopSignals."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handle(signum, frame):
        received.append(signal.Signals(signum).name)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else None
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, plot_path: Path) -> None:
    """Train loss per step and eval loss where measured, on one chart; for preference pairs a second panel shows
    the reward margin (chosen minus rejected), train and eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)

    def series(key: str) -> list[tuple[int, float]]:
        return [(e["step"], e[key]) for e in events if e.get(key) is not None]

    margins = series("rewards/margins") + series("eval_rewards/margins")
    figure, panels = plt.subplots(1, 2 if margins else 1, figsize=(12 if margins else 7, 4), squeeze=False)
    axes = panels[0][0]
    for key, style, label in (("loss", "-", "train loss"), ("eval_loss", "o-", "eval loss")):
        if series(key):
            axes.plot(*zip(*series(key)), style, label=label, linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over pairs)" if margins else "loss (mean over response tokens)")
    axes.grid(alpha=0.3)
    axes.legend()
    if margins:
        axes = panels[0][1]
        for key, style, label in (("rewards/margins", "-", "train"), ("eval_rewards/margins", "o-", "eval")):
            if series(key):
                axes.plot(*zip(*series(key)), style, label=label, linewidth=1.2)
        axes.axhline(0.0, color="gray", linewidth=0.8)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("reward margin (chosen - rejected)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
