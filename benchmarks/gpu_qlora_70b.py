"""A 70B-architecture QLoRA run on one GPU: `zerotune train` itself, peak GPU and host memory.

Llama-2-70B shapes (hidden 8192, 80 layers, GQA 64/8 heads, intermediate 28672, vocab 32000), random
weights built in 4-bit on the GPU (`--init random --method qlora`: no 138 GB of weight files, which the GPU
box's disk could not hold anyway), LoRA r16 on all linear layers, seq 2048, micro-batch 1, gradient
checkpointing. Runs the CLI in a subprocess and reads its metrics.jsonl; host RSS from getrusage.

There is no HF baseline in this file: the HF QLoRA path needs the weights on disk to quantize while loading.

Usage: python benchmarks/gpu_qlora_70b.py --out DIR [--steps N] [--layers N] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LLAMA_2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/qlora-70b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=80, help="decoder layers (80 is the real 70B)")
    parser.add_argument("extra", nargs="*", help="more `zerotune train` flags")
    args = parser.parse_args()
    import torch

    from zerotune.bench import provenance, write_model_dir

    result = provenance("python benchmarks/gpu_qlora_70b.py " + " ".join(sys.argv[1:]))
    work = Path(args.work)
    model_dir = write_model_dir(work / "model", {**LLAMA_2_70B, "num_hidden_layers": args.layers}, torch.bfloat16,
                                saved_weights=False, seed=0)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [4 + (i * 7919 + j * 104729) % 31990 for j in range(2048)]})
                            + "\n" for i in range(args.steps + 2)))
    output = work / "run"
    command = [sys.executable, "-c",
               "import resource, sys; from zerotune.cli import main; status = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)",
               "train", "--model", str(model_dir), "--init", "random", "--method", "qlora",
               "--gradient-checkpointing", "--data", str(data), "--template", "tokens", "--max-seq-len", "2048",
               "--batch-size", "1", "--max-steps", str(args.steps), "--tracking", "none", "--eval-fraction", "0",
               "--lora-dropout", "0", "--output-dir", str(output), "--overwrite", "--quiet", *args.extra]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()] \
        if (output / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "loss" in m]
    timed = steps[2:] or steps  # the first steps include compilation and allocator warm-up
    peak_rss = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    result.update({
        "workload": f"QLoRA, Llama-2-70B architecture ({args.layers} layers), random NF4 weights, LoRA r16 "
                    "all-linear, seq 2048, micro-batch 1, gradient checkpointing, one GPU",
        "exit_status": done.returncode, "wall_seconds": time.time() - started,
        "losses": [m["loss"] for m in steps],
        "tokens_per_second": sum(m["tokens_per_second"] for m in timed) / len(timed) if timed else None,
        "peak_gpu_gib": max((m.get("peak_memory_gib", 0) for m in steps), default=None),
        "peak_host_rss_gib": int(peak_rss[0].split()[1]) / 2**20 if peak_rss else None,
        "metrics": steps,
        "tail": (done.stderr or "")[-3000:] if done.returncode else "",
    })
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "qlora_70b.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=1))


if __name__ == "__main__":
    main()
