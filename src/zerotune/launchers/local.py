"""N worker processes on this machine through torch's elastic agent (the machinery behind torchrun).

``--max-restarts N`` lets the agent restart every worker after one fails; the restarted workers resume from
the newest checkpoint (zerotune.train.RunSession). SIGTERM or SIGINT to this process reaches the workers,
which finish their step and write a checkpoint within SHUTDOWN_SECONDS.

Nothing listens beyond this machine: the agents meet through a file (torch's c10d rendezvous on a FileStore,
not a TCPStore, which would listen on every interface), the agent hosts no store for the workers, and the
workers' own store, gloo and NCCL stay on loopback (zerotune.strategies.process_group).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from zerotune.config import RunConfig, config_from_dict
from zerotune.errors import ZerotuneError
from zerotune.strategies.process_group import LOOPBACK

SHUTDOWN_SECONDS = 300  # how long a stopping worker may take to finish its step and checkpoint


@dataclass
class WorkerError:
    """A user-facing error raised in a worker, carried back to the launching process."""

    message: str


def _worker(config_tree: dict, settings_tree: dict):
    """Entry point of each spawned worker: the config and the settings the launcher resolved."""
    import torch

    from zerotune.resolve import Settings
    from zerotune.train import run

    workers = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    config = config_from_dict(config_tree)
    try:
        result = run(config, show_progress=int(os.environ.get("RANK", 0)) == 0,
                     settings=Settings.from_dict(settings_tree))
    except ZerotuneError as error:
        return WorkerError(str(error))
    if result.preempted:
        # The agent that forwarded the signal is shutting down and will never collect a return value; a worker
        # that returned would wait for it until the shutdown timeout. The checkpoint is on disk: leave now.
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return result if int(os.environ.get("RANK", 0)) == 0 else None


def launch_local(config: RunConfig, settings):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import dataclasses

    # torch >= 2.12 lets the agent wait longer than 30 s for stopping workers; older torch has no such knob.
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    waits = {"shutdown_timeout": SHUTDOWN_SECONDS} if "shutdown_timeout" in fields else {}
    # MASTER_ADDR for the workers (else the host's name); their store listens on loopback either way.
    address = {"local_addr": LOOPBACK} if "local_addr" in fields else {}
    with tempfile.TemporaryDirectory(prefix="zerotune-rendezvous-") as rendezvous, _no_agent_store():
        launch_config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=config.distributed.num_workers,
            run_id=f"zerotune-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint=os.path.join(rendezvous, "store"),
            rdzv_configs={"store_type": "file"},
            max_restarts=config.distributed.max_restarts,
            monitor_interval=0.5,
            start_method="spawn",
            **waits,
            **address,
        )
        try:
            results = elastic_launch(launch_config, _worker)(config.to_dict(), settings.to_dict())
        except SignalException as stop:
            return _stopped(config, stop)
    errors = [value.message for value in results.values() if isinstance(value, WorkerError)]
    if errors:
        raise ZerotuneError(errors[0])
    return results.get(0)


@contextlib.contextmanager
def _no_agent_store():
    """torch elastic's agent would host a TCPStore for its workers on every interface; with this variable set
    it hosts none, and rank 0 hosts the group's store on loopback. The agent reads it at each rendezvous."""
    name = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _stopped(config: RunConfig, stop):
    """The agent got SIGTERM/SIGINT and passed it on; the workers checkpointed before exiting."""
    from zerotune.checkpoints import newest_checkpoint
    from zerotune.train import RunResult

    checkpoint = newest_checkpoint(Path(config.output.dir))
    if checkpoint is None:
        raise ZerotuneError(f"stopped by {stop.sigval.name} before any checkpoint was written; "
                            "start again without --resume")
    return RunResult(output_dir=Path(config.output.dir), preempted=True, checkpoint=checkpoint)
