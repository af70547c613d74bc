"""QLoRA on one GPU, under FSDP2 and under DeepSpeed ZeRO-3 on two: step-1 loss and per-GPU peak memory.

A Llama-2-7B-shaped model cut to --layers decoder layers, random bf16 weights saved once (bitsandbytes
quantizes while loading), random-token rows of 2048. Global batch 2 everywhere: one GPU runs micro-batch 1 x
grad-accum 2, two GPUs micro-batch 1 each, so step 1 sees the same two rows and must give the same loss.

Diagnostic runs, by name in --runs: single_eager and fsdp2_2gpu_eager (--compile off), fsdp2_1gpu (FSDP2 on one
GPU, grad-accum 2), zero3_1gpu, and zero3_2gpu_release (our preset plus stage3_max_reuse_distance 0 and
stage3_max_live_parameters 1e8: every gathered layer is freed after use, even when checkpointing reuses it soon).

Usage: python benchmarks/gpu_qlora_sharded.py --out DIR [--layers 8] [--runs single,fsdp2_2gpu,...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--work", default="/tmp/qlora-sharded")
    parser.add_argument("--runs", default="single,fsdp2_2gpu,zero3_2gpu")
    args = parser.parse_args()
    from zerotune.bench import ARCHITECTURES, provenance, write_model_dir

    work = Path(args.work)
    arch = dict(ARCHITECTURES["llama-2-7b"], num_hidden_layers=args.layers)
    model_dir = write_model_dir(work / "model", arch, torch.bfloat16, saved_weights=True, seed=0)
    rng = random.Random(0)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [rng.randrange(4, 32000) for _ in range(2048)]}) + "\n"
                            for _ in range(16)))
    runs = {"single": ["--strategy", "single", "--grad-accum", "2"],
            "fsdp2_2gpu": ["--strategy", "fsdp", "--num-workers", "2"],
            "zero3_2gpu": ["--strategy", "deepspeed", "--zero-stage", "3", "--num-workers", "2"],
            "single_eager": ["--strategy", "single", "--grad-accum", "2", "--compile", "off"],
            "fsdp2_2gpu_eager": ["--strategy", "fsdp", "--num-workers", "2", "--compile", "off"],
            "fsdp2_1gpu": ["--strategy", "fsdp", "--num-workers", "1", "--grad-accum", "2"],
            "zero3_1gpu": ["--strategy", "deepspeed", "--zero-stage", "3", "--num-workers", "1", "--grad-accum", "2"],
            "zero3_2gpu_release": ["--strategy", "deepspeed", "--num-workers", "2", "--deepspeed",
                                   str(work / "release.json")]}
    release = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
               "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                     "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                     "stage3_param_persistence_threshold": "auto", "stage3_max_reuse_distance": 0,
                                     "stage3_max_live_parameters": 100_000_000}}
    (work / "release.json").write_text(json.dumps(release))
    runs = {name: runs[name] for name in args.runs.split(",")}
    results = {"what": __doc__.splitlines()[0],
               **provenance("python benchmarks/gpu_qlora_sharded.py " + " ".join(sys.argv[1:])),
               "layers": args.layers, "runs": {}}
    for name, flags in runs.items():
        output = work / name
        command = [sys.executable, "-m", "zerotune", "train", "--model", str(model_dir), "--data", str(data),
                   "--template", "tokens", "--method", "qlora", "--max-seq-len", "2048", "--batch-size", "1",
                   "--max-steps", "3", "--gradient-checkpointing", "--lora-dropout", "0", "--warmup-steps", "0",
                   "--tracking", "none", "--log-every", "1", "--eval-fraction", "0", "--output-dir", str(output),
                   "--overwrite", "--quiet", *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        entry = {"flags": flags, "exit_status": done.returncode,
                 "setup_note": [line for line in done.stdout.splitlines() if "memory after setup" in line]}
        if done.returncode == 0:
            events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
            steps = [e for e in events if "loss" in e]
            entry.update(losses=[e["loss"] for e in steps], peak_gib=max(e.get("peak_memory_gib", 0) for e in steps),
                         tokens_per_second=steps[-1]["tokens_per_second"])
        else:
            entry["error_tail"] = (done.stderr or done.stdout)[-3000:]
        results["runs"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "error_tail"}),
              entry.get("error_tail", "")[-1500:], flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "qlora_sharded.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
