"""``zerotune quickstart``: the whole product offline on a CPU in about a minute.

Builds a tiny Llama-architecture model and a BPE tokenizer from the bundled data, pre-trains it briefly on
English counting up (full fine-tuning), then fine-tunes it with LoRA on English and Spanish counting (up and
down), and prints held-out generations before and after the LoRA run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from zerotune.errors import ConfigError
from zerotune.resources import resource_path

MARKER = ".zerotune-quickstart"
# the tiny Llama-architecture model the quickstart builds (zerotune.tiny.save_tiny_model's arguments)
MODEL_SIZE = dict(vocab_size=400, hidden_size=192, layers=4, heads=6, intermediate_size=512, seed=0)


resource = resource_path


def tokenizer_corpus(records: list[dict]) -> list[str]:
    from zerotune.data.templates import ALPACA, ALPACA_ES

    texts = []
    for record in records:
        for template in (ALPACA, ALPACA_ES):
            texts.append(template.render_prompt(record["instruction"], record.get("input", "")) + record["output"])
    return texts


def counting_pairs(records: list[dict]) -> list[dict]:
    """Preference pairs from counting records: the right count is chosen, one that overshoots by a number is
    rejected ("3, 4, 5" over "3, 4, 5, 6"; "10, 11 y 12" over "10, 11, 12 y 13"). The preference demo's data."""
    import re

    pairs = []
    for record in records:
        numbers = [int(n) for n in re.findall(r"\d+", record["output"])]
        beyond = numbers[-1] + (1 if numbers[-1] >= numbers[0] else -1)
        head, _, last = record["output"].rpartition(" y ")
        rejected = f"{head}, {last} y {beyond}" if head else f"{record['output']}, {beyond}"
        pairs.append({"prompt": record["instruction"], "input": record.get("input", ""), "chosen": record["output"],
                      "rejected": rejected, "lang": record.get("lang", "en")})
    return pairs


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _claim_output_dir(output_dir: Path) -> None:
    """Re-running the quickstart replaces its own earlier output, never anything else."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MARKER).exists():
            raise ConfigError(f"{output_dir}: exists and was not made by the quickstart; pass another --output-dir")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / MARKER).write_text("made by zerotune quickstart\n")


def run_quickstart(output_dir: Path, max_steps: int | None = None, tracking: str | None = None) -> dict:
    import importlib.util

    from zerotune.config import build_config, load_yaml
    from zerotune.generate import SamplingOptions, generate, load_for_generation, render_prompt, resolve_template
    from zerotune.launchers import launch
    from zerotune.preflight import preflight
    from zerotune.tiny import save_tiny_model
    from zerotune.run_dir import prepare_output_dir

    started = time.time()
    _claim_output_dir(output_dir)
    train_file, eval_file = resource("quickstart_train.jsonl"), resource("quickstart_eval.jsonl")
    held_out = _read_jsonl(eval_file)
    base_dir = save_tiny_model(output_dir / "base-model", tokenizer_corpus(_read_jsonl(train_file) + held_out),
                               "llama", **MODEL_SIZE)
    print(f"built a tiny Llama-architecture model and tokenizer in {base_dir}")
    base_dir = _pretrain_base(base_dir, output_dir / "base-pretrain")

    if tracking is None:
        tracking = "mlflow" if importlib.util.find_spec("mlflow") else "none"
    overrides = {
        "model.name": str(base_dir), "data.path": str(train_file), "data.eval_path": str(eval_file),
        "output.dir": str(output_dir / "run"), "tracking.backend": tracking,
        "tracking.uri": f"sqlite:///{(output_dir / 'mlflow.db').resolve()}",
        "tracking.experiment": "zerotune-quickstart",
    }
    if max_steps:
        overrides["train.max_steps"] = max_steps
    config = build_config(load_yaml(resource("quickstart.yaml")), overrides)
    if tracking == "mlflow":
        _create_experiment(config.tracking.uri, config.tracking.experiment, output_dir / "mlartifacts")

    templates = [resolve_template("auto", None, record) for record in held_out]
    model, tokenizer = load_for_generation(str(base_dir), None)
    prompts = [render_prompt(record, template, tokenizer) for record, template in zip(held_out, templates)]
    options = SamplingOptions(max_new_tokens=32)
    before = generate(model, tokenizer, prompts, options)

    preflight(config)
    prepare_output_dir(Path(config.output.dir), overwrite=False)
    result = launch(config)
    adapter_dir = Path(config.output.dir) / "adapter"
    model, tokenizer = load_for_generation(str(base_dir), str(adapter_dir))
    after = generate(model, tokenizer, prompts, options)

    report = _report(held_out, before, after, result, time.time() - started, Path(config.output.dir))
    (output_dir / "quickstart_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _pretrain_base(random_dir: Path, output_dir: Path) -> Path:
    """Give the random model English counting (full fine-tuning), so LoRA has a base worth adapting."""
    from zerotune.config import build_config
    from zerotune.launchers import launch
    from zerotune.run_dir import prepare_output_dir

    config = build_config({
        "model.name": str(random_dir), "model.dtype": "fp32", "adapter.method": "full",
        "data.path": str(resource("quickstart_base.jsonl")), "data.eval_fraction": 0.0, "data.template": "alpaca",
        "train.max_steps": 80, "train.batch_size": 16, "train.lr": 1e-3, "train.warmup_steps": 5,
        "train.seed": 0, "train.log_every": 10, "tracking.backend": "none", "output.dir": str(output_dir),
    })
    prepare_output_dir(output_dir, overwrite=False)
    print("pre-training the base model on English counting only (full fine-tuning, 80 steps)")
    launch(config)
    return output_dir / "model"


def _create_experiment(uri: str, name: str, artifacts: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def _report(held_out, before, after, result, seconds: float, run_dir: Path) -> dict:
    exact_before = sum(b == r["output"] for b, r in zip(before, held_out))
    exact_after = sum(a == r["output"] for a, r in zip(after, held_out))
    # Held-out records come five per number pair: up, down, up-with-input (English), up, down (Spanish).
    shown = [pair * 5 + task for pair in range(2) for task in (1, 3, 4)]
    print("\nHeld-out instructions (never seen in training), greedy decoding:\n")
    for index in shown:
        record = held_out[index]
        print(f"  instruction: {record['instruction']}")
        print(f"    expected: {record['output']}")
        print(f"    before:   {before[index][:70]!r}")
        print(f"    after:    {after[index][:70]!r}\n")
    eval_first, eval_last = result.eval_losses[0], result.eval_losses[-1]
    print(f"eval loss {eval_first:.3f} -> {eval_last:.3f} (first and last evaluation)")
    print(f"exact answers on {len(held_out)} held-out instructions: {exact_before} before, {exact_after} after")
    print(f"run directory: {run_dir} (adapter/, metrics.jsonl, loss.png, config.yaml); {seconds:.0f} s in all")
    return {"exact_before": exact_before, "exact_after": exact_after, "held_out": len(held_out),
            "eval_losses": result.eval_losses, "train_losses": result.losses, "seconds": seconds,
            "before": before, "after": after}
