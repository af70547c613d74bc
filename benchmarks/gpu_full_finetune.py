"""Full fine-tuning of a Llama-2-7B-architecture model (random bf16 weights) on one GPU through `zerotune train`:
tokens/s and peak memory, a data point for `zerotune plan`.

Usage: python benchmarks/gpu_full_finetune.py --out DIR [--steps 10] [extra zerotune train flags ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default="/tmp/full-finetune")
    args, extra = parser.parse_known_args()
    from zerotune.bench import ARCHITECTURES, Workload, provenance, token_records, write_model_dir

    work = Path(args.work)
    model_dir = write_model_dir(work / "model", ARCHITECTURES["llama-2-7b"], torch.bfloat16, saved_weights=False, seed=0)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in token_records(Workload("full", ""), 32000, 16, 0)))
    command = [sys.executable, "-m", "zerotune", "train", "--model", str(model_dir), "--init", "random", "--method",
               "full", "--data", str(data), "--template", "tokens", "--max-seq-len", "2048", "--batch-size", "1",
               "--max-steps", str(args.steps), "--tracking", "none", "--log-every", "1", "--eval-fraction", "0",
               "--warmup-steps", "0", "--output-dir", str(work / "run"), "--overwrite", "--quiet", *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    result = {"what": __doc__.splitlines()[0],
              **provenance("python benchmarks/gpu_full_finetune.py " + " ".join(sys.argv[1:])),
              "exit_status": done.returncode}
    if done.returncode == 0:
        steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "step_seconds" in s]
        timed = steps[3:]
        result.update(losses=[s["loss"] for s in steps], peak_gib=max(s["peak_memory_gib"] for s in steps),
                      tokens_per_second=sum(s["tokens_per_second"] * s["step_seconds"] for s in timed)
                      / sum(s["step_seconds"] for s in timed), timed_steps=len(timed))
    else:
        result["error_tail"] = done.stderr[-3000:]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "full_finetune.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
