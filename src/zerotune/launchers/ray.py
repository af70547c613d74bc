"""Ray Train: a TorchTrainer whose workers each call ``zerotune.train.run``.

``--ray-address auto`` joins a running cluster, whose network exposure is the cluster's; Ray creates the
process group there (gloo on CPU, NCCL on GPU) and our strategies join it. No address starts a local Ray
bound to 127.0.0.1 (GCS, raylet, object manager, agents, workers), and the workers build their process group
themselves, on loopback (zerotune.strategies.process_group): nothing listens beyond this machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zerotune.config import RunConfig, config_from_dict
from zerotune.errors import ConfigError


def _ray_session():
    """The loop's RunSession under Ray Train: restore from the latest checkpoint Ray has (after a worker or
    node failure, when FailureConfig restarts the group), and report each new checkpoint to Ray."""
    import ray.train

    from zerotune.train import RunSession

    class RaySession(RunSession):
        def restore_from(self, config, output_dir):
            """The newer of Ray's latest registered checkpoint and our newest complete one. Ray registers a
            checkpoint only once its controller has collected the report, so a worker killed right after a
            save can leave Ray one checkpoint behind; the output directory (fresh at the job's start, so
            anything in it is this job's) never is."""
            from zerotune.checkpoints import newest_checkpoint, step_of

            candidates = [newest_checkpoint(output_dir)]
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                local = type(checkpoint.filesystem).__name__ == "LocalFileSystem"
                candidates.append(Path(checkpoint.path) if local else Path(checkpoint.to_directory()))
            candidates = [c for c in candidates if c is not None]
            return max(candidates, key=step_of) if candidates else None

        def checkpoint_saved(self, step, path, metrics, is_main):
            # Every worker reports (Ray's barrier); rank 0 hands over the committed directory.
            checkpoint = ray.train.Checkpoint.from_directory(str(path)) if is_main else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=path.name)

    return RaySession()


def _worker(trees: dict) -> None:
    """Each Ray worker: the config and the settings the driver resolved."""
    import ray.train
    import torch

    from zerotune.resolve import Settings

    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    os.environ["RANK"] = str(context.get_world_rank())
    os.environ["WORLD_SIZE"] = str(context.get_world_size())
    config = config_from_dict(trees["config"])
    if config.distributed.use_cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    else:
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)
    from zerotune.train import run

    run(config, show_progress=context.get_world_rank() == 0, session=_ray_session(),
        settings=Settings.from_dict(trees["settings"]))


def available_cpus(address: str) -> float:
    """Logical CPUs of the Ray cluster (what ScalingConfig's workers reserve, one each)."""
    import ray

    connect(address, 0)
    return ray.cluster_resources().get("CPU", 0)


def available_gpus(address: str) -> float:
    import ray

    connect(address, 0)
    return ray.cluster_resources().get("GPU", 0)


def cluster_machine(config: RunConfig):
    """The GPU the workers will get, as one of them sees it (a one-GPU task in the cluster); the CPU where the
    cluster has no GPUs."""
    import ray

    from zerotune.resolve import Machine

    if available_gpus(config.distributed.ray_address) <= 0:
        return Machine("cpu")

    @ray.remote(num_gpus=1, num_cpus=0)
    def read_gpu() -> dict:
        from dataclasses import asdict

        import torch

        return asdict(Machine.of(torch.device("cuda", 0)))

    return Machine(**ray.get(read_gpu.remote()))


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
            _start_local_ray(num_cpus=max(num_workers, os.cpu_count() or 1))
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot reach Ray at {address!r}: {str(error).splitlines()[0]}; start it with "
                          "'ray start --head' or drop --ray-address to run a local Ray") from None


def _start_local_ray(num_cpus: int) -> None:
    """A one-machine Ray whose every server listens on 127.0.0.1 only.

    Ray binds its gRPC servers (GCS, raylet, object manager, each worker) to 127.0.0.1 only when the node's
    address is 127.0.0.1, and ray.init turns a 127.0.0.1 given as _node_ip_address into the machine's
    address, unless multi-node clusters are off, as Ray has them on macOS and Windows: switch them off while
    Ray starts (its processes inherit the variable; the runtime-env and dashboard agents then bind the node's
    address, 127.0.0.1, too). No dashboard: nothing serves HTTP."""
    import ray
    import ray._private.ray_constants as ray_constants

    name, before = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    enabled = ray_constants.ENABLE_RAY_CLUSTER  # read when ray was first imported
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    if not _ray_on_loopback():
        import sys

        print(f"zerotune: the local Ray took {ray.util.get_node_ip_address()} as its address, not 127.0.0.1: its "
              "servers may listen on every interface (see docs/reliability.md, Network exposure)", file=sys.stderr)


def _ray_on_loopback() -> bool:
    """This Ray's node address is loopback: its servers listen there, and no other machine can join it."""
    import ipaddress

    import ray

    try:
        return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback
    except ValueError:
        return False


def _loopback_torch_config():
    """Ray Train's torch backend, minus its process group: that one's store (rank 0's TCPStore) listens on
    every interface. Each worker gets MASTER_PORT, a free port of worker 0's (this machine's), and builds the
    group on loopback itself in zerotune.strategies.process_group."""
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    from zerotune.strategies.process_group import LOOPBACK, free_port

    def set_master(port: int) -> None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)

    class LoopbackBackend(Backend):
        share_cuda_visible_devices = True  # as Ray's torch backend: a worker sees its node's GPUs

        def on_start(self, worker_group, backend_config):
            worker_group.execute(set_master, port=worker_group.execute_single(0, free_port))

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackBackend

    return LoopbackTorchConfig()


def launch_ray(config: RunConfig, settings):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from zerotune.train import RunResult

    connect(config.distributed.ray_address, config.distributed.num_workers)
    use_gpu = settings.device_type == "cuda"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config.to_dict(), "settings": settings.to_dict()},
        torch_config=_loopback_torch_config() if _ray_on_loopback() else None,
        scaling_config=ScalingConfig(num_workers=config.distributed.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RayRunConfig(name="zerotune", storage_path=str(Path(config.output.dir).resolve() / "ray"),
                                failure_config=FailureConfig(max_failures=config.distributed.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep)),
    )
    try:
        trainer.fit()
    except Exception as failure:  # Ray wraps worker exceptions; a user-facing one keeps its message
        user_error = _find_user_error(failure)
        if user_error is None:
            raise
        raise ConfigError(str(user_error)) from None
    from zerotune.tracking import METRICS_FILE, read_metrics

    events = read_metrics(Path(config.output.dir) / METRICS_FILE)
    saved = Path(config.output.dir) / ("model" if config.adapter.method == "full" else "adapter")
    summary = json.loads((saved / "zerotune.json").read_text())
    return RunResult(losses=[e["loss"] for e in events if "loss" in e],
                     eval_losses=[e["eval_loss"] for e in events if "eval_loss" in e],
                     output_dir=Path(config.output.dir), strategy=summary["strategy"])


def _find_user_error(error: BaseException | None):
    """The ZerotuneError inside Ray's wrappers (TrainingFailedError, WorkerGroupError, ...), if any."""
    from zerotune.errors import ZerotuneError

    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ZerotuneError):
            return current
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
