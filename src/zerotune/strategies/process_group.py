"""Join (or create) the process group and pick this worker's device.

Launchers (torch elastic, Ray Train) set RANK / WORLD_SIZE / LOCAL_RANK; Ray may already have created
the group. A single process with a multi-process strategy gets a one-member group on a free local port.

When every rank runs on this machine (LOCAL_WORLD_SIZE == WORLD_SIZE), nothing listens beyond it: rank 0
hosts the group's store on 127.0.0.1 (torch's own TCPStore listens on all interfaces) and gloo / NCCL open
their sockets on the loopback interface, unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name another.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerPlace:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), for GLOO_SOCKET_IFNAME."""
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        flags = Path("/sys/class/net", name, "flags")
        if flags.exists() and int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
            return name
    return "lo0" if "lo0" in names else "lo"


def all_ranks_here() -> bool:
    """Every rank runs on this machine: torch elastic and Ray set LOCAL_WORLD_SIZE; one process counts too."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return world_size == 1 or os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)


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
        # One process needs no network store: a HashStore in memory (a TCP store here would bind a port, and a
        # later group in the same process could find it still taken).
        if world_size == 1:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if world_size == 1 else _store_arguments()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                **store)
    if dist.is_initialized():
        return WorkerPlace(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return WorkerPlace(0, 1, 0, device)


def _store_arguments() -> dict:
    """Where the group's ranks meet: torchrun's agent store when it offers one, else a store on loopback
    when every rank is on this machine, else torch's default (env://: rank 0 listens on all interfaces)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _restart_safe_store()
    return _loopback_store() if all_ranks_here() else {}


def _restart_safe_store() -> dict:
    """Under torch elastic the workers share the agent's store, which outlives a restart: the ranks' addresses
    from the failed attempt are still in it, and a restarted group would dial dead ports. A prefix per
    attempt keeps every attempt's keys apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not attempt:
        return {}
    from datetime import timedelta

    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timedelta(minutes=10))
    return {"store": dist.PrefixStore(f"zerotune/attempt_{attempt}", agent_store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def _loopback_store() -> dict:
    """The group's store, hosted by rank 0 on 127.0.0.1:MASTER_PORT (all ranks are on this machine, whatever
    MASTER_ADDR names), and gloo's / NCCL's sockets on the loopback interface. torch's TCPStore would listen
    on every interface; given a socket already bound to loopback (master_listen_fd), it listens there."""
    from datetime import timedelta

    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())
    rank, world_size, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    listen_fd = {}
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted group reuses the port
        listener.bind((LOOPBACK, port))
        listener.listen(socket.SOMAXCONN)
        listen_fd = {"master_listen_fd": listener.detach()}  # the store owns the socket from here on
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=rank == 0, timeout=timedelta(minutes=10),
                          **listen_fd)
    return {"store": store, "rank": rank, "world_size": world_size}


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
