"""Ray Train: a TorchTrainer whose workers each call ``zerotune.train.run``.

Ray creates the process group (gloo on CPU, NCCL on GPU); our strategies join it. ``--ray-address auto``
joins a running cluster; no address starts a local Ray instance.
"""

from __future__ import annotations

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

    result = run(config, show_progress=context.get_world_rank() == 0)
    ray.train.report({"losses": result.losses, "eval_losses": result.eval_losses, "strategy": result.strategy})


def connect(address: str, num_workers: int):
    import ray

    if ray.is_initialized():
        return
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
    use_gpu = not config.distributed.use_cpu
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.distributed.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RayRunConfig(name="zerotune", storage_path=str(Path(config.output.dir).resolve() / "ray"),
                                failure_config=FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    metrics = result.metrics or {}
    return RunResult(losses=metrics.get("losses", []), eval_losses=metrics.get("eval_losses", []),
                     output_dir=Path(config.output.dir), strategy=metrics.get("strategy", ""))
