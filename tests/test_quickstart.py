"""The README's first command, end to end: it learns visibly, leaves an MLflow run and loss.png."""

import json
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    started = time.time()
    completed = subprocess.run([sys.executable, "-m", "zerotune", "quickstart", "--output-dir", str(out)],
                               capture_output=True, text=True, timeout=600)
    elapsed = time.time() - started
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "before:" in completed.stdout and "after:" in completed.stdout
    report = json.loads((out / "quickstart_report.json").read_text())
    assert report["eval_losses"][-1] < 0.7 * report["eval_losses"][0]
    assert report["exact_after"] > report["exact_before"]
    assert (out / "run" / "loss.png").stat().st_size > 5000
    assert (out / "run" / "adapter" / "adapter_model.safetensors").is_file()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["zerotune-quickstart"])
    mlflow.set_tracking_uri(None)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    print(f"quickstart took {elapsed:.0f} s")
