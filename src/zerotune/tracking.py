"""Metrics: metrics.jsonl always, MLflow when enabled, a progress bar, and loss.png at the end.

Only rank 0 creates a Tracker; other ranks get NullTracker, so a job makes exactly one MLflow run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from zerotune.config import RunConfig

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


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
        self.mlflow = None
        self.run_id = None
        if resume_step is not None and self.metrics_path.is_file():
            kept = [e for e in read_metrics(self.metrics_path) if e.get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        if config.tracking.backend == "mlflow":
            self._start_mlflow(config, resume_run_id)

    def _start_mlflow(self, config: RunConfig, resume_run_id: str | None = None) -> None:
        try:
            import mlflow
        except ImportError:
            from zerotune.errors import ConfigError

            raise ConfigError("tracking.backend mlflow needs mlflow: pip install mlflow, or pass --tracking none") from None
        if config.tracking.uri:
            mlflow.set_tracking_uri(config.tracking.uri)
        uri = mlflow.get_tracking_uri()
        if mlflow.get_experiment_by_name(config.tracking.experiment) is None and uri.startswith("sqlite:///"):
            # Keep artifacts next to the store, not in whichever directory a worker happens to run.
            artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
            mlflow.create_experiment(config.tracking.experiment, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(config.tracking.experiment)
        if resume_run_id:  # one job, one MLflow run, across resumes
            self.run_id = mlflow.start_run(run_id=resume_run_id).info.run_id
            self.mlflow = mlflow
            return
        run = mlflow.start_run(run_name=Path(config.output.dir).name)
        self.run_id = run.info.run_id
        flat = {}
        for section, values in config.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if not isinstance(value, list) else ",".join(map(str, value))
        mlflow.log_params(flat)
        self.mlflow = mlflow

    def start(self, total_steps: int, initial_step: int = 0) -> None:
        if self.show_progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        event = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        if self.mlflow is not None:
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.mlflow.log_metrics(finite, step=step)
        if self.progress is not None:
            if "loss" in metrics:
                self.progress.n = step
                self.progress.set_postfix(
                    loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}",
                    tok_s=f"{metrics.get('tokens_per_second', 0):,.0f}", refresh=False,
                )
                self.progress.refresh()
            if "eval_loss" in metrics:
                self.progress.write(
                    f"step {step}: eval_loss {metrics['eval_loss']:.4f}  perplexity {metrics['eval_perplexity']:.2f}"
                )

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    def log_artifacts(self, paths: list[Path]) -> None:
        if self.mlflow is None:
            return
        for path in paths:
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                self.mlflow.log_artifact(str(path))

    def finish(self, status: str = "FINISHED") -> None:
        """Close the bar, draw loss.png, end the MLflow run (FINISHED, KILLED when preempted, FAILED)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        plot_losses(self.metrics_path, self.output_dir / LOSS_PLOT)
        if self.mlflow is not None:
            self.log_artifacts([self.output_dir / LOSS_PLOT])
            self.mlflow.end_run(status=status)
            self.mlflow = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, plot_path: Path) -> None:
    """Train loss per step and eval loss where measured, on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in events if "eval_loss" in e]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over response tokens)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
