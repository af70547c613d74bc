"""How workers start. Every launcher ends with each worker calling ``zerotune.train.run(config)``."""

from __future__ import annotations

import os

from typing import Callable

from zerotune.config import RunConfig
from zerotune.resolve import Machine, Settings, explain_launcher, resolve


def choose_launcher(config: RunConfig) -> str:
    """auto: ray when a Ray address is given (--ray-address, or RAY_ADDRESS as `ray job submit` sets it),
    in-process for one worker, else local processes (zerotune.resolve.explain_launcher)."""
    return explain_launcher(config)[0]


def machine_for(config: RunConfig) -> Machine:
    """The accelerator the workers will run on, read once here. One in-process worker reads its own GPU; local
    workers' GPU is read in a short child process, so this launcher holds no CUDA context on GPU 0 while they
    train; Ray's, by a one-GPU task in the cluster."""
    if config.distributed.use_cpu:
        return Machine("cpu")
    launcher = choose_launcher(config)
    if launcher == "ray":
        from zerotune.launchers.ray import cluster_machine

        return cluster_machine(config)
    import torch

    if not torch.cuda.is_available():
        return Machine("cpu")
    if launcher == "inprocess":
        return Machine.of(torch.device("cuda", 0))
    import json
    import subprocess
    import sys

    probe = ("import json, torch; from dataclasses import asdict; from zerotune.resolve import Machine; "
             "print(json.dumps(asdict(Machine.of(torch.device('cuda', 0)))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return Machine(**json.loads(out.strip().splitlines()[-1]))


def settings_for(config: RunConfig, fixed_shapes: Callable[[], bool | None] | None = None) -> Settings:
    """Every "auto" and hidden rule decided for this run on the machine its workers will use (zerotune.resolve).
    ``fixed_shapes``: whether every batch has one shape, asked only where the step-graph rule needs it; by
    default the data is tokenized here to find out."""
    from zerotune.preflight import check_quantization, one_batch_shape

    settings = resolve(config, machine_for(config), fixed_shapes=fixed_shapes or (lambda: one_batch_shape(config)))
    check_quantization(config, settings)
    return settings


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


def launch(config: RunConfig, show_progress: bool = True, settings: Settings | None = None):
    """Run training with the launcher ``settings`` (resolved here when not given) name; every worker gets the
    same settings. Returns rank 0's RunResult."""
    config = absolute_paths(config)
    settings = settings or settings_for(config)
    if settings.launcher == "inprocess":
        from zerotune.train import run

        return run(config, show_progress=show_progress, settings=settings)
    if settings.launcher == "local":
        from zerotune.launchers.local import launch_local

        return launch_local(config, settings)
    from zerotune.launchers.ray import launch_ray

    return launch_ray(config, settings)
