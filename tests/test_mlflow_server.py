"""A real `mlflow server` on 127.0.0.1: the run, its params, metrics and artifacts arrive."""

import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import train
from zerotune.strategies.process_group import free_port

pytest.importorskip("mlflow")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow  # starts an MLflow server process (about a minute)
def test_run_metrics_and_artifacts_reach_server(config_for, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    config = config_for(**{"tracking.backend": "mlflow", "tracking.uri": mlflow_server,
                           "tracking.experiment": "server-test", "train.max_steps": 3})
    result = train(config)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id
    run = runs[0]
    assert run.data.params["train.max_steps"] == "3"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(result.losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.yaml", "loss.png"} <= artifacts
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    mlflow.set_tracking_uri(None)
