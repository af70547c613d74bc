"""Preference tuning under what SFT runs have: SIGTERM then `--resume` gives the uninterrupted run's losses and
adapter exactly, and the Ray launcher on 2 CPU workers gives the one-process losses (1e-5)."""

import subprocess

import pytest
import torch

from conftest import make_config
from helpers import adapter_weights, losses_of, preempt_after_three_steps, train
from test_resume import cli
from zerotune.cli import main

pytestmark = pytest.mark.slow


def dpo_args(model, data, out, steps):
    return ["--model", model, "--data", data, "--output-dir", out, "--objective", "dpo", "--max-steps", steps,
            "--batch-size", "4", "--dtype", "fp32", "--max-seq-len", "128", "--eval-fraction", "0", "--lr", "1e-2",
            "--seed", "0", "--tracking", "none", "--quiet", "--save-steps", "2"]


def test_sigterm_checkpoints_then_resume_matches(tiny_llama, pairs_file, tmp_path):
    steps = 20
    reference = tmp_path / "reference"
    assert main(["train", *map(str, dpo_args(tiny_llama, pairs_file, reference, steps))]) == 0  # in this process
    out = tmp_path / "run"
    process = subprocess.Popen(cli(*dpo_args(tiny_llama, pairs_file, out, steps)), stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    preempt_after_three_steps(process, out, steps)
    subprocess.run(cli(*dpo_args(tiny_llama, pairs_file, out, steps), "--resume"), check=True, capture_output=True)
    assert losses_of(out) == losses_of(reference)
    resumed, expected = adapter_weights(out), adapter_weights(reference)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_ray_launcher_matches_one_process(tiny_llama, pairs_file, tmp_path):
    ray = pytest.importorskip("ray")
    settings = {"objective.name": "dpo", "train.batch_size": 2, "train.max_steps": 3}
    expected = train(make_config(tiny_llama, pairs_file, tmp_path / "single",
                                 **settings, **{"train.grad_accum": 4})).losses
    try:
        result = train(make_config(tiny_llama, pairs_file, tmp_path / "ray", **settings, **{
            "train.grad_accum": 2, "distributed.launcher": "ray", "distributed.num_workers": 2,
            "distributed.use_cpu": True, "distributed.strategy": "ddp"}))
    finally:
        ray.shutdown()
    assert result.strategy == "ddp"
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected), rtol=1e-5, atol=0)
    single, workers = adapter_weights(tmp_path / "single"), adapter_weights(tmp_path / "ray")
    for key in single:
        torch.testing.assert_close(workers[key], single[key], rtol=1e-4, atol=1e-6)
