"""How workers start. Every launcher ends with each worker calling ``zerotune.train.run(config)``."""

from __future__ import annotations

import os

from zerotune.config import RunConfig


def choose_launcher(config: RunConfig) -> str:
    """auto: ray when a Ray address is given (--ray-address, or RAY_ADDRESS as `ray job submit` sets it),
    in-process for one worker, else local processes."""
    launcher = config.distributed.launcher
    if launcher == "auto":
        if config.distributed.ray_address or os.environ.get("RAY_ADDRESS"):
            return "ray"
        return "inprocess" if config.distributed.num_workers == 1 else "local"
    if launcher == "local" and config.distributed.num_workers == 1:
        return "inprocess"
    return launcher


def absolute_paths(config: RunConfig) -> RunConfig:
    """Workers may run in another directory (Ray does): make every local path absolute, and pin the
    default MLflow store to this directory."""
    import dataclasses
    from pathlib import Path

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    tracking = config.tracking
    if tracking.backend == "mlflow" and not tracking.uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        tracking = dataclasses.replace(tracking, uri=uri)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, name=absolute(config.model.name)),
        data=dataclasses.replace(config.data, path=absolute(config.data.path),
                                 eval_path=absolute(config.data.eval_path)),
        distributed=dataclasses.replace(config.distributed,
                                        deepspeed_config=absolute(config.distributed.deepspeed_config)),
        output=dataclasses.replace(config.output, dir=str(Path(config.output.dir).expanduser().resolve())),
        tracking=tracking,
    )


def leave_after_preemption(config: RunConfig, status: int) -> int:
    """The exit status of a run stopped early by SIGTERM/SIGINT, its checkpoint written. Under the local launcher
    this process leaves at once with it: torch's elastic agent, stopped by the signal, can leave a C++ thread
    that aborts the interpreter's shutdown ("terminate called without an active exception": exit -6, not the
    status; seen once in CI). The checkpoint is on disk and the workers are gone (they leave with os._exit too)."""
    if choose_launcher(config) == "local":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def launch(config: RunConfig, show_progress: bool = True):
    """Run training with the chosen launcher; returns rank 0's RunResult."""
    config = absolute_paths(config)
    name = choose_launcher(config)
    if name == "inprocess":
        from zerotune.train import run

        return run(config, show_progress=show_progress)
    if name == "local":
        from zerotune.launchers.local import launch_local

        return launch_local(config)
    from zerotune.launchers.ray import launch_ray

    return launch_ray(config)
