"""Ray Train launcher on CPU: a two-node local cluster, the tutorial's line; an unreachable address."""

import json

import pytest

from zerotune.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_ray():
    yield
    ray.shutdown()


# A Ray run's losses and adapter against one process, and its listening sockets: tests/test_resume.py, on the
# Ray run that loses a worker and recovers (test_ray_restarts_after_a_worker_dies and
# test_local_ray_listens_on_loopback_only).


def test_tutorial_line_on_two_node_cluster(tiny_llama, tmp_path, monkeypatch, fresh_ray):
    """`zerotune train --num-workers 4 --use-cpu --no-deepspeed --model M`, verbatim, submitted to a Ray
    cluster of two nodes (as `ray job submit` would: RAY_ADDRESS set). No --data: the bundled sample."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        status = main(["train", "--num-workers", "4", "--use-cpu", "--no-deepspeed", "--model", str(tiny_llama)])
        assert status == 0
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = tmp_path / "runs" / "zerotune"
    metadata = json.loads((out / "adapter" / "zerotune.json").read_text())
    assert metadata["strategy"] == "ddp" and metadata["workers"] == 4
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 5 and losses[-1] < losses[0]


def test_unreachable_ray_address(tiny_llama, alpaca_file, tmp_path, capsys, fresh_ray):
    status = main(["train", "--model", str(tiny_llama), "--data", str(alpaca_file), "--output-dir",
                   str(tmp_path / "out"), "--num-workers", "2", "--use-cpu", "--ray-address", "127.0.0.1:1",
                   "--tracking", "none"])
    err = capsys.readouterr().err
    assert status == 2 and "cannot reach Ray at '127.0.0.1:1'" in err
