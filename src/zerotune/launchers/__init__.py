"""How workers start. Every launcher ends with each worker calling ``zerotune.train.run(config)``."""

from __future__ import annotations

from zerotune.config import RunConfig


def choose_launcher(config: RunConfig) -> str:
    """auto: ray when a Ray address is given, in-process for one worker, else local processes."""
    launcher = config.distributed.launcher
    if launcher == "auto":
        if config.distributed.ray_address:
            return "ray"
        return "inprocess" if config.distributed.num_workers == 1 else "local"
    if launcher == "local" and config.distributed.num_workers == 1:
        return "inprocess"
    return launcher


def launch(config: RunConfig, show_progress: bool = True):
    """Run training with the chosen launcher; returns rank 0's RunResult."""
    name = choose_launcher(config)
    if name == "inprocess":
        from zerotune.train import run

        return run(config, show_progress=show_progress)
    if name == "local":
        from zerotune.launchers.local import launch_local

        return launch_local(config)
    from zerotune.launchers.ray import launch_ray

    return launch_ray(config)
