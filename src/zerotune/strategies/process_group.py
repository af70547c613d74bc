"""Join (or create) the process group and pick this worker's device.

Launchers (torch elastic, Ray Train) set RANK / WORLD_SIZE / LOCAL_RANK; Ray may already have created
the group. A single process with a multi-process strategy gets a one-member group on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerPlace:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_process_group(use_cpu: bool, need_group: bool) -> WorkerPlace:
    use_cuda = torch.cuda.is_available() and not use_cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not dist.is_initialized() and (world_size > 1 or need_group):
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                **_restart_safe_store())
    if dist.is_initialized():
        return WorkerPlace(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return WorkerPlace(0, 1, 0, device)


def _restart_safe_store() -> dict:
    """Under torch elastic the workers share the agent's store, which outlives a restart: the ranks' addresses
    from the failed attempt are still in it, and a restarted group would dial dead ports. A prefix per
    attempt keeps every attempt's keys apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timedelta(minutes=10))
    return {"store": dist.PrefixStore(f"zerotune/attempt_{attempt}", agent_store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
