"""Preference tuning end to end on CPU: each objective from the CLI, its metrics, evaluation, plot, full fine-tuning's
frozen reference, resume, the non-finite guard, MLflow, and generate/merge on the adapter it trains."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_config
from helpers import adapter_weights, train
from zerotune.checkpoints import step_name
from zerotune.cli import main

OBJECTIVES = ["dpo", "orpo", "simpo"]
PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"]


def pair_config(model, data, out, objective="dpo", **overrides):
    return make_config(model, data, out, **{"objective.name": objective, **overrides})


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_from_the_cli(objective, tiny_llama, pairs_file, tmp_path):
    out = tmp_path / "run"
    status = main(["train", "--model", str(tiny_llama), "--data", str(pairs_file), "--objective", objective,
                   "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--dtype", "fp32",
                   "--max-seq-len", "128", "--eval-fraction", "0.25", "--eval-every", "3", "--lr", "1e-2",
                   "--lora-dropout", "0", "--tracking", "none", "--quiet"])
    assert status == 0
    events = events_of(out)
    steps = [e for e in events if "loss" in e]
    evals = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3] and [e["step"] for e in evals] == [0, 3]
    for event in steps:
        assert all(math.isfinite(event[key]) for key in ["loss", *PAIR_METRICS])
        assert event["rewards/margins"] == pytest.approx(event["rewards/chosen"] - event["rewards/rejected"],
                                                         abs=1e-6)
        assert event["rewards/accuracies"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 pairs a step
    for event in evals:
        assert all(math.isfinite(event[f"eval_{key}"]) for key in ["loss", *PAIR_METRICS])
    if objective == "dpo":  # LoRA starts as the base (B = 0): every pair's log-ratio is 0
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["eval_rewards/margins"] == 0
        assert evals[1]["eval_rewards/margins"] > 0  # training moved the policy away from the reference
    if objective == "orpo":
        for event in steps:
            assert event["loss"] == pytest.approx(event["odds_ratio_loss"] + event["nll_loss"], rel=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    metadata = json.loads((out / "adapter" / "zerotune.json").read_text())
    assert metadata["objective"] == objective and set(metadata["templates_used"]) == {"alpaca", "alpaca_es"}
    import matplotlib.image

    assert matplotlib.image.imread(out / "loss.png").shape[:2] == (400, 1200)  # loss and reward-margin panels


def test_full_finetune_dpo_keeps_a_frozen_reference(tiny_llama, pairs_file, tmp_path):
    """The reference is a copy of the base: the first step's policy equals it (loss log 2), later ones do not
    (a reference that followed the policy would give log 2 and zero rewards at every step)."""
    result = train(pair_config(tiny_llama, pairs_file, tmp_path / "run", **{"adapter.method": "full",
                                                                           "train.lr": 1e-3}))
    steps = [e for e in events_of(tmp_path / "run") if "loss" in e]
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(e["rewards/chosen"]) > 1e-4 for e in steps[1:]) and result.losses[-1] < math.log(2)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_full_finetune_dpo_under_a_sharding_engine_is_refused_in_one_line(tiny_llama, pairs_file, tmp_path):
    from zerotune.errors import ConfigError
    from zerotune.objectives import create_objective
    from zerotune.objectives.step import frozen_reference

    with pytest.raises(ConfigError, match="objective.name dpo with --method full keeps a frozen reference copy"):
        frozen_reference(create_objective(pair_config(tiny_llama, pairs_file, tmp_path).objective), torch.nn.Linear(1, 1),
                         "full", "fsdp")


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_losses(tiny_llama, pairs_file, tmp_path):
    """Batch 4 in one micro-batch or in 4 micro-batches of 1: the same per-step loss (pair-weighted normalisation),
    for ORPO too, whose NLL term is normalised by the global count of chosen tokens."""
    for objective in ("dpo", "orpo"):
        one = train(pair_config(tiny_llama, pairs_file, tmp_path / f"{objective}-1", objective))
        four = train(pair_config(tiny_llama, pairs_file, tmp_path / f"{objective}-4", objective,
                                 **{"train.batch_size": 1, "train.grad_accum": 4}))
        torch.testing.assert_close(torch.tensor(four.losses), torch.tensor(one.losses), rtol=1e-5, atol=0)


def test_resume_is_exact(tiny_llama, pairs_file, tmp_path):
    settings = {"train.max_steps": 4, "train.grad_accum": 2, "train.batch_size": 2, "checkpoint.save_steps": 2,
                "adapter.dropout": 0.1}
    expected = train(pair_config(tiny_llama, pairs_file, tmp_path / "full", **settings))
    run_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run_dir)  # as an interruption right after the checkpoint of step 2 leaves it
    shutil.rmtree(run_dir / "checkpoints" / step_name(4))
    shutil.rmtree(run_dir / "adapter")
    resumed = train(pair_config(tiny_llama, pairs_file, run_dir, **settings, **{"checkpoint.resume": True}))
    assert resumed.resumed_from == 2 and resumed.losses == expected.losses
    reference, got = adapter_weights(tmp_path / "full"), adapter_weights(run_dir)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_a_nonfinite_loss_stops_naming_the_step(tiny_llama, pairs_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan_llama")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "nan_llama")
    status = main(["train", "--model", str(tmp_path / "nan_llama"), "--data", str(pairs_file), "--objective", "simpo",
                   "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--tracking", "none", "--quiet",
                   "--dtype", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and err.startswith("zerotune: error: step 1: loss nan"), err


def test_rewards_reach_mlflow(tiny_llama, pairs_file, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(pair_config(tiny_llama, pairs_file, tmp_path / "run", **{
        "tracking.backend": "mlflow", "tracking.uri": uri, "data.eval_fraction": 0.2}))
    client = mlflow.tracking.MlflowClient(uri)
    margins = client.get_metric_history(result.mlflow_run_id, "rewards/margins")
    assert sorted(m.step for m in margins) == [1, 2, 3]
    assert client.get_metric_history(result.mlflow_run_id, "eval_rewards/accuracies")


def test_generate_and_merge_work_on_a_preference_adapter(tiny_llama, pairs_file, tmp_path, capsys):
    config = pair_config(tiny_llama, pairs_file, tmp_path / "run", **{"train.lr": 5e-2})
    train(config)
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_llama), "--adapter", str(adapter), "--instruction",
                 "Count from 3 to 5.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["merge", "--model", str(tiny_llama), "--adapter", str(adapter), "--output-dir",
                 str(tmp_path / "merged")]) == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_docs_examples_train(tiny_llama, tmp_path, monkeypatch):
    """Each command on docs/preference.md runs (with the tiny model for the quickstart's, one step, no MLflow)
    on the example files it names."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "preference.md").read_text()
    commands = [block.split("```")[0].replace("\\\n", " ") for block in page.split("```bash\n")[1:]]
    assert len(commands) == 3
    monkeypatch.chdir(root)
    for command in commands:
        argv = shlex.split(command.replace("quickstart-output/base-pretrain/model", str(tiny_llama))
                           .replace("runs/", f"{tmp_path}/"))
        assert argv[:2] == ["zerotune", "train"]
        assert main([*argv[1:], "--max-steps", "1", "--tracking", "none", "--quiet"]) == 0, command
    assert {p.name for p in tmp_path.iterdir()} == {"dpo", "orpo", "simpo"}


@pytest.mark.slow
def test_preference_demo_raises_held_out_accuracy(tmp_path):
    """The quickstart's model (its architecture and tokenizer, before its pre-training) tuned with SimPO on counting
    pairs (the right count chosen, an overshoot rejected): on the 40 held-out pairs, whose numbers training never
    saw, the share the model prefers correctly rises from chance to nearly all (measured: 0.525 -> 1.0)."""
    from conftest import read_jsonl, write_jsonl
    from zerotune.config import build_config
    from zerotune.quickstart import MODEL_SIZE, counting_pairs, resource, tokenizer_corpus
    from zerotune.tiny import save_tiny_model

    records, held_out = read_jsonl(resource("quickstart_train.jsonl")), read_jsonl(resource("quickstart_eval.jsonl"))
    model = save_tiny_model(tmp_path / "base-model", tokenizer_corpus(records + held_out), "llama", **MODEL_SIZE)
    config = build_config({
        "model.name": str(model), "model.dtype": "fp32", "objective.name": "simpo", "objective.beta": 2.0,
        "data.path": str(write_jsonl(tmp_path / "train.jsonl", counting_pairs(records))),
        "data.eval_path": str(write_jsonl(tmp_path / "eval.jsonl", counting_pairs(held_out))),
        "data.max_seq_len": 128, "train.max_steps": 15, "train.batch_size": 8, "train.lr": 2e-3, "train.seed": 0,
        "train.eval_every": 15, "adapter.dropout": 0.0, "tracking.backend": "none", "output.dir": str(tmp_path / "run")})
    train(config)
    before, after = [e for e in events_of(tmp_path / "run") if "eval_loss" in e]
    assert before["eval_rewards/accuracies"] <= 0.6 and after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] and after["eval_loss"] < before["eval_loss"]


@pytest.mark.slow
def test_precomputed_reference_gives_the_live_losses(tiny_llama, pairs_file, tmp_path):
    """--reference precomputed: the reference log-probs scored once before training (kept in the run directory)
    give the losses and rewards of scoring them in every step; full fine-tuning needs no frozen copy then."""
    settings = {"data.eval_fraction": 0.2, "train.eval_every": 3}
    live = train(pair_config(tiny_llama, pairs_file, tmp_path / "live", **settings))
    stored = train(pair_config(tiny_llama, pairs_file, tmp_path / "stored", **settings,
                               **{"objective.reference": "precomputed"}))
    assert (tmp_path / "stored" / "reference_logps.safetensors").is_file()
    torch.testing.assert_close(torch.tensor(stored.losses), torch.tensor(live.losses), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(stored.eval_losses), torch.tensor(live.eval_losses), rtol=1e-5, atol=1e-7)
    full = train(pair_config(tiny_llama, pairs_file, tmp_path / "full", **{
        "objective.reference": "precomputed", "adapter.method": "full", "train.lr": 1e-3}))
    frozen = train(pair_config(tiny_llama, pairs_file, tmp_path / "frozen", **{"adapter.method": "full",
                                                                              "train.lr": 1e-3}))
    torch.testing.assert_close(torch.tensor(full.losses), torch.tensor(frozen.losses), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_precomputed_reference_is_read_back_on_resume(tiny_llama, pairs_file, tmp_path):
    settings = {"train.max_steps": 4, "checkpoint.save_steps": 2, "objective.reference": "precomputed",
                "adapter.method": "full", "train.lr": 1e-3}
    expected = train(pair_config(tiny_llama, pairs_file, tmp_path / "run", **settings))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / step_name(4))
    shutil.rmtree(tmp_path / "run" / "model")
    resumed = train(pair_config(tiny_llama, pairs_file, tmp_path / "run", **settings, **{"checkpoint.resume": True}))
    assert resumed.resumed_from == 2 and resumed.losses == expected.losses
    shutil.rmtree(tmp_path / "run" / "model")
    (tmp_path / "run" / "reference_logps.safetensors").unlink()
    with pytest.raises(Exception, match="reference_logps.safetensors: missing, and the checkpoint's model has trained"):
        train(pair_config(tiny_llama, pairs_file, tmp_path / "run", **settings, **{"checkpoint.resume": True}))
