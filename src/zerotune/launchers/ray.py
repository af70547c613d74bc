"""Ray Train: a TorchTrainer whose workers each call ``zerotune.train.run``.

Ray creates the process group (gloo on CPU, NCCL on GPU); our strategies join it. ``--ray-address auto``
joins a running cluster; no address starts a local Ray instance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zerotune.config import RunConfig, config_from_dict
from zerotune.errors import ConfigError


def _worker(config_tree: dict) -> None:
    import ray.train
    import torch

    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    config = config_from_dict(config_tree)
    if config.distributed.use_cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    else:
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)
    from zerotune.train import run

    run(config, show_progress=context.get_world_rank() == 0)


def available_cpus(address: str) -> float:
    """Logical CPUs of the Ray cluster (what ScalingConfig's workers reserve, one each)."""
    import ray

    connect(address, 0)
    return ray.cluster_resources().get("CPU", 0)


def available_gpus(address: str) -> float:
    import ray

    connect(address, 0)
    return ray.cluster_resources().get("GPU", 0)


def check_reachable(address: str) -> None:
    """Fail in seconds on a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    if not address or address == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot reach Ray at {address!r}: {error}; start it with 'ray start --head' "
                          "or drop --ray-address to run a local Ray") from None


def connect(address: str, num_workers: int):
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=max(num_workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot reach Ray at {address!r}: {str(error).splitlines()[0]}; start it with "
                          "'ray start --head' or drop --ray-address to run a local Ray") from None


def launch_ray(config: RunConfig):
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from zerotune.train import RunResult

    connect(config.distributed.ray_address, config.distributed.num_workers)
    use_gpu = not config.distributed.use_cpu and available_gpus(config.distributed.ray_address) > 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.distributed.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RayRunConfig(name="zerotune", storage_path=str(Path(config.output.dir).resolve() / "ray"),
                                failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()
    from zerotune.tracking import METRICS_FILE, read_metrics

    events = read_metrics(Path(config.output.dir) / METRICS_FILE)
    saved = Path(config.output.dir) / ("model" if config.adapter.method == "full" else "adapter")
    summary = json.loads((saved / "zerotune.json").read_text())
    return RunResult(losses=[e["loss"] for e in events if "loss" in e],
                     eval_losses=[e["eval_loss"] for e in events if "eval_loss" in e],
                     output_dir=Path(config.output.dir), strategy=summary["strategy"])
