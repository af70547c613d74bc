"""Ray Train launcher on CPU: same losses as the other launchers, a two-node local cluster, the tutorial's line."""

import json

import pytest
import torch

from conftest import make_config
from helpers import adapter_weights, train, watched_run
from zerotune.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_ray():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(tiny_llama, alpaca_file, tmp_path_factory):
    """2 FSDP2 workers on a local Ray through the CLI, with make_config's settings (lr, seed, no dropout), its
    listening sockets watched (helpers.watched_run): the two tests below assert on this one run."""
    pytest.importorskip("psutil")
    tmp = tmp_path_factory.mktemp("ray")
    sockets = watched_run(tmp, tiny_llama, alpaca_file, "--launcher", "ray", "--strategy", "fsdp", "--grad-accum",
                          "2", "--lr", "1e-2", "--seed", "0", "--lora-dropout", "0")
    return tmp / "run", sockets


def test_ray_launcher_matches_single_process(ray_run, tiny_llama, alpaca_file, tmp_path):
    out, _ = ray_run
    single = make_config(tiny_llama, alpaca_file, tmp_path / "single",
                         **{"train.batch_size": 2, "train.grad_accum": 4})
    expected = train(single).losses
    assert json.loads((out / "adapter" / "zerotune.json").read_text())["strategy"] == "fsdp"
    losses = [event["loss"] for event in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in event]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    single_adapter, ray_adapter = adapter_weights(tmp_path / "single"), adapter_weights(out)
    for key in single_adapter:
        torch.testing.assert_close(ray_adapter[key], single_adapter[key], rtol=1e-4, atol=1e-6)


def test_local_ray_listens_on_loopback_only(ray_run):
    """As tests/test_network_exposure.py asks of the local launcher: every listening socket of the run's
    processes (GCS, raylet, agents, workers) on loopback."""
    _, sockets = ray_run
    owners = " | ".join(sockets.owners())
    for component in ("gcs_server", "raylet", "RayTrainWorker"):
        assert component in owners, f"no listening socket of {component} seen: {owners[:2000]}"
    assert sockets.exposed() == []


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
