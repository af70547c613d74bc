"""Metrics: metrics.jsonl always, MLflow when enabled, a progress bar, and loss.png at the end.

Only rank 0 creates a Tracker; other ranks get NullTracker, so a job makes exactly one MLflow run.

This file holds the Tracker, metrics.jsonl and the plot. MLflow's client, which never takes training down (one
background thread, a probe of the store at start-up, one line on stderr at its first failure), is
zerotune.mlflow_sink.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from zerotune.config import RunConfig
from zerotune.mlflow_sink import MlflowSink, start_mlflow

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
