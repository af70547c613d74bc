"""Single-machine runs listen on loopback only.

While a real 2-worker CPU run goes on, every TCP socket in LISTEN state owned by the run's processes is
collected (helpers.ListeningSockets): the launching process, everything it started (torch's elastic agent and
workers; Ray's GCS, raylet, agents and workers), and any process naming the run's Ray session directory. Each
must be bound to 127.0.0.1 or ::1 (or ::ffff:127.0.0.1), never to 0.0.0.0 or ::. Those checks ride on runs that
other tests make anyway, rather than on runs of their own, both in tests/test_resume.py:
test_local_launcher_listens_on_loopback_only on the local launcher's SIGTERM run, and
test_local_ray_listens_on_loopback_only on the Ray run that loses a worker. Here: one process's group.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import is_loopback

psutil = pytest.importorskip("psutil")


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
