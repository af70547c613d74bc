"""A preference run on the fast path against the plain one, on one GPU: `zerotune train` with the chunked head and
--fused-projections on (compiled layers and bf16 by default there) against --no-chunked-loss --fused-projections off,
on a random 4-layer Llama (hidden 1024, 32k vocabulary) and 64 counting pairs of 150-250 numbers. Prints each
run's per-step losses, peak allocated memory, median tokens/s from step 5 on, and the log's fused/chunked lines.

Usage: python benchmarks/gpu_preference_fast_path.py WORK_DIR [--objectives dpo orpo] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from zerotune.quickstart import resource, tokenizer_corpus
from zerotune.tiny import build_model, build_tokenizer


def prepare(work: Path) -> None:
    records = [json.loads(line) for line in open(resource("quickstart_train.jsonl"))]
    tokenizer = build_tokenizer(tokenizer_corpus(records), 600)
    model = build_model("llama", 32000, hidden_size=1024, layers=4, heads=8, kv_heads=4, intermediate_size=2816,
                        seed=0)
    for name in ("bos", "eos", "pad"):
        setattr(model.config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    with open(work / "pairs.jsonl", "w") as pairs:
        for _ in range(64):
            n = rng.randint(150, 250)
            good = ", ".join(str(j) for j in range(1, n + 1))
            pairs.write(json.dumps({"prompt": f"Count from 1 to {n}.", "chosen": good,
                                    "rejected": f"{good}, {n + 1}"}) + "\n")


def run(work: Path, name: str, objective: str, steps: int, *extra: str) -> None:
    out = work / f"{name}-{objective}"
    command = [sys.executable, "-m", "zerotune", "train", "--model", str(work / "model"), "--data",
               str(work / "pairs.jsonl"), "--objective", objective, "--output-dir", str(out), "--max-steps",
               str(steps), "--batch-size", "8", "--max-seq-len", "1024", "--lr", "1e-4", "--lora-dropout", "0",
               "--tracking", "none", "--quiet", *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(name, objective, "failed:", done.stderr[-4000:])
        return
    steps_logged = [e for e in map(json.loads, open(out / "metrics.jsonl")) if "loss" in e]
    speeds = sorted(e["tokens_per_second"] for e in steps_logged[4:])
    print(f"{name:6s} {objective}: losses {[round(e['loss'], 4) for e in steps_logged]}")
    print(f"   peak {max(e.get('peak_memory_gib', 0) for e in steps_logged):.3f} GiB, median tokens/s from step 5 "
          f"{speeds[len(speeds) // 2]:.0f}")
    for line in (done.stdout + done.stderr).splitlines():
        if "fused" in line or "chunked" in line or "graph break" in line.lower():
            print("   log:", line[:240])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--objectives", nargs="+", default=["dpo"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    for objective in args.objectives:
        run(args.work, "fast", objective, args.steps, "--fused-projections", "on")
        run(args.work, "plain", objective, args.steps, "--no-chunked-loss", "--fused-projections", "off")


if __name__ == "__main__":
    main()
