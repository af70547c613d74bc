"""Single-machine runs listen on loopback only.

While a real 2-worker CPU run goes on (local launcher, then Ray), every TCP socket in LISTEN state owned by the
run's processes is collected: the launching process, everything it started (torch's elastic agent and
workers; Ray's GCS, raylet, agents and workers), and any process naming the run's Ray session directory. Each
must be bound to 127.0.0.1 or ::1 (or ::ffff:127.0.0.1), never to 0.0.0.0 or ::.
"""

import ipaddress
import json
import os
import subprocess
import sys
import threading
import time

import pytest


psutil = pytest.importorskip("psutil")

RUN_SECONDS = 600  # Ray's start-up alone can take minutes on 2 busy cores


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


class ListeningSockets:
    """Polls, from a thread, the listening TCP sockets of a process tree (and of Ray's session) until stopped."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.seen: dict[tuple[int, str, int], str] = {}  # (pid, ip, port) -> the owner's command line
        self.session_dirs: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list:
        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for process in processes:
            self._note_session(process)
        if self.session_dirs:  # Ray processes that are no descendants (re-parented) still name the session
            for process in psutil.process_iter(["cmdline"]):
                command = " ".join(process.info["cmdline"] or [])
                if any(session in command for session in self.session_dirs):
                    processes.append(process)
        return processes

    def _note_session(self, process) -> None:
        try:
            for argument in process.cmdline():
                for flag in ("--session-dir=", "--session_dir="):
                    if argument.startswith(flag):
                        self.session_dirs.add(argument[len(flag):])
        except psutil.Error:
            pass

    def _poll(self) -> None:
        while not self._stop.is_set():
            for process in self._processes():
                try:
                    connections = process.net_connections(kind="tcp")
                    command = " ".join(process.cmdline()) or process.name()
                except psutil.Error:
                    continue
                for connection in connections:
                    if connection.status == psutil.CONN_LISTEN:
                        self.seen.setdefault((process.pid, connection.laddr.ip, connection.laddr.port), command)
            time.sleep(0.2)

    def exposed(self) -> list[str]:
        return [f"{ip}:{port} (pid {pid}: {command[:120]})" for (pid, ip, port), command in sorted(self.seen.items())
                if not is_loopback(ip)]

    def owners(self) -> list[str]:
        return list(self.seen.values())


def watched_run(tmp_path, tiny_llama, alpaca_file, *launcher_args) -> ListeningSockets:
    """One 2-worker CPU run through the CLI, its listening sockets collected while it runs."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "zerotune", "train", "--model", str(tiny_llama), "--data", str(alpaca_file),
               "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--dtype", "fp32",
               "--max-seq-len", "128", "--eval-fraction", "0", "--tracking", "none", "--quiet",
               "--num-workers", "2", "--use-cpu", *launcher_args]
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    with ListeningSockets(process.pid) as sockets:
        try:
            process.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()
    assert process.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    return sockets


def test_one_process_group_listens_on_loopback(tmp_path):
    """A one-member group (a single process with a multi-process engine): its store lives in memory (nothing
    listens for it), and gloo is on loopback."""
    script = ("import json, psutil, torch, torch.distributed as dist, os\n"
              "from zerotune.strategies.process_group import join_process_group, leave_process_group\n"
              "join_process_group(use_cpu=True, need_group=True)\n"
              "dist.all_reduce(torch.ones(1))\n"
              "print(json.dumps({'ips': [c.laddr.ip for c in psutil.Process().net_connections('tcp')\n"
              "                          if c.status == psutil.CONN_LISTEN],\n"
              "                  'gloo': os.environ.get('GLOO_SOCKET_IFNAME')}))\n"
              "leave_process_group()\n")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert [ip for ip in seen["ips"] if not is_loopback(ip)] == []
    # gloo binds the address of the host's name unless told an interface: on loopback, the one holding 127.0.0.1.
    assert seen["gloo"] and any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[seen["gloo"]])


@pytest.mark.slow
def test_local_launcher_listens_on_loopback_only(tmp_path, tiny_llama, alpaca_file):
    sockets = watched_run(tmp_path, tiny_llama, alpaca_file, "--strategy", "ddp")
    # The watch saw the run: both workers' gloo sockets and rank 0's store.
    assert len(sockets.seen) >= 3 and len({pid for pid, _, _ in sockets.seen}) >= 2, sockets.seen
    assert sockets.exposed() == []


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(tmp_path, tiny_llama, alpaca_file):
    pytest.importorskip("ray")
    sockets = watched_run(tmp_path, tiny_llama, alpaca_file, "--launcher", "ray", "--strategy", "fsdp")
    owners = " | ".join(sockets.owners())
    for component in ("gcs_server", "raylet", "RayTrainWorker"):
        assert component in owners, f"no listening socket of {component} seen: {owners[:2000]}"
    assert sockets.exposed() == []


def test_a_one_process_group_needs_no_port(tmp_path):
    """In one process, groups come and go (tests, bench, a run after a run): a port still held by an earlier
    store must not stop the next group. Here MASTER_PORT names a port something else is listening on."""
    script = ("import os, socket, torch, torch.distributed as dist\n"
              "held = socket.socket(); held.bind(('127.0.0.1', 0)); held.listen()\n"
              "os.environ['MASTER_PORT'] = str(held.getsockname()[1])\n"
              "from zerotune.strategies.process_group import join_process_group, leave_process_group\n"
              "for _ in range(2):\n"
              "    join_process_group(use_cpu=True, need_group=True)\n"
              "    t = torch.ones(1); dist.all_reduce(t); assert float(t) == 1.0\n"
              "    leave_process_group()\n"
              "print('ok')\n")
    environment = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
