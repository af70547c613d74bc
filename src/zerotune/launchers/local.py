"""N worker processes on this machine through torch's elastic agent (the machinery behind torchrun)."""

from __future__ import annotations

import os
import uuid

from zerotune.config import RunConfig, config_from_dict
from zerotune.strategies.process_group import free_port


def _worker(config_tree: dict):
    """Entry point of each spawned worker."""
    import torch

    from zerotune.train import run

    workers = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    config = config_from_dict(config_tree)
    result = run(config, show_progress=int(os.environ.get("RANK", 0)) == 0)
    return result if int(os.environ.get("RANK", 0)) == 0 else None


def launch_local(config: RunConfig, max_restarts: int = 0):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.distributed.num_workers,
        run_id=f"zerotune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    results = elastic_launch(launch_config, _worker)(config.to_dict())
    return results.get(0)
