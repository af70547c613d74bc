"""GPU check of kill-and-resume (issue: checkpoints): FSDP2 and ZeRO-3 on 2 GPUs, NCCL, bf16.

For each engine: an uninterrupted run; then the same run SIGKILLed (its whole process group) once checkpoint
8 exists, and resumed with --resume. Records both runs' per-step losses and their largest difference.
Model: Llama-2-7B layer shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) with 4 layers, random bf16
weights, LoRA r16 on all linear layers, micro-batch 4 x 1024 tokens, gradient checkpointing.

Usage: python benchmarks/gpu_resume_check.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_engines import build_data  # noqa: E402

ENGINES = {"fsdp": ["--strategy", "fsdp"], "zero3": ["--strategy", "deepspeed", "--zero-stage", "3"]}
STEPS, SAVE_EVERY, KILL_AFTER = 16, 4, 8


def build_model(directory: Path) -> None:
    import torch

    from zerotune.tiny import build_model as build, build_tokenizer

    tokenizer = build_tokenizer([", ".join(str(i) for i in range(3000))] * 4, vocab_size=400)
    torch.set_default_dtype(torch.bfloat16)
    model = build("llama", 32000, hidden_size=4096, layers=4, heads=32, intermediate_size=11008)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def command(model: Path, data: Path, out: Path, engine: str) -> list[str]:
    return [sys.executable, "-m", "zerotune", "train", "--model", str(model), "--data", str(data), "--output-dir",
            str(out), "--tracking", "none", "--max-steps", str(STEPS), "--batch-size", "4", "--max-seq-len", "1024",
            "--gradient-checkpointing", "--dtype", "bf16", "--eval-fraction", "0", "--lr", "1e-4", "--quiet",
            "--num-workers", "2", "--save-steps", str(SAVE_EVERY), "--lora-dropout", "0.05", *ENGINES[engine]]


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def check(engine: str, model: Path, data: Path, work: Path) -> dict:
    reference, interrupted = work / f"{engine}_reference", work / f"{engine}_interrupted"
    for path in (reference, interrupted):
        shutil.rmtree(path, ignore_errors=True)
    base = subprocess.run(command(model, data, reference, engine), capture_output=True, text=True)
    if base.returncode:
        return {"engine": engine, "error": base.stderr[-2000:]}
    process = subprocess.Popen(command(model, data, interrupted, engine), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    marker = interrupted / "checkpoints" / f"step-{KILL_AFTER:08d}"
    while not marker.is_dir() and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(losses(interrupted))
    resumed = subprocess.run(command(model, data, interrupted, engine) + ["--resume"], capture_output=True, text=True)
    if resumed.returncode:
        return {"engine": engine, "error": resumed.stderr[-2000:]}
    left, right = losses(reference), losses(interrupted)
    before = [abs(a - b) for a, b in zip(left[:KILL_AFTER], right[:KILL_AFTER])]
    after = [abs(a - b) for a, b in zip(left[KILL_AFTER:], right[KILL_AFTER:])]
    return {"max_abs_difference_before_kill": max(before), "max_abs_difference_after_resume": max(after),
            "engine": engine, "command": " ".join(command(model, data, interrupted, engine)[1:]),
            "steps_logged_before_kill": killed_at, "resumed_from_step": KILL_AFTER,
            "losses_uninterrupted": left, "losses_resumed": right,
            "max_abs_loss_difference": max(abs(a - b) for a, b in zip(left, right)),
            "identical": left == right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    import torch

    work = Path("/tmp/zerotune-gpu")
    work.mkdir(exist_ok=True)
    model, data = work / "llama2-7b-width-4-layers", work / "long.jsonl"
    if not (model / "config.json").exists():
        build_model(model)
    build_data(data)
    results = {"workload": "kill and resume, Llama-2-7B layer shapes x 4 layers, LoRA r16, mb4 x 1024, ckpt, bf16",
               "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
               "date": datetime.date.today().isoformat(), "commit": os.environ.get("ZEROTUNE_COMMIT", "unknown"),
               "command": "python benchmarks/gpu_resume_check.py " + " ".join(sys.argv[1:]), "runs": []}
    for engine in args.engines.split(","):
        record = check(engine, model, data, work)
        results["runs"].append(record)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"gpu_resume_check_{args.engines.replace(',', '_')}.json").write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in record.items() if not k.startswith("losses")}), flush=True)


if __name__ == "__main__":
    main()
