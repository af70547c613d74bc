"""A 70B-architecture run: `zerotune train` itself, peak GPU and host memory. QLoRA on one GPU, or LoRA
sharded over several (FSDP2 or DeepSpeed ZeRO-3, with --sharded-loading).

Llama-2-70B shapes (hidden 8192, 80 layers, GQA 64/8 heads, intermediate 28672, vocab 32000), random
weights made on the GPUs, no 138 GB of weight files (which the GPU box's disk could not hold anyway):
QLoRA builds them in 4-bit one matrix at a time; FSDP2 draws each rank's rows from one seeded generator;
ZeRO-3 initialises each module inside zero.Init. LoRA r16 on all linear layers, seq 2048, micro-batch 1 per
GPU, gradient checkpointing. Runs the CLI in a subprocess and reads its metrics.jsonl. Host memory: the
largest process's peak RSS (getrusage, workers included) and the node's peak of used memory (MemTotal -
MemAvailable, sampled every 0.2 s, less what was used before the run).

There is no HF baseline in this file: the HF paths need the weights on disk.

Usage: python benchmarks/gpu_70b.py --out DIR [--method qlora|lora] [--engine single|fsdp|zero3]
       [--workers N] [--steps N] [--layers N] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

LLAMA_2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


class NodeMemory:
    """Peak of the node's used memory (MemTotal - MemAvailable) above what was used at the start."""

    def __init__(self, interval: float = 0.2):
        self.start_used = self.peak = self._used()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])) * 1024

    def _watch(self, interval: float) -> None:
        while not self._done.wait(interval):
            self.peak = max(self.peak, self._used())

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return (self.peak - self.start_used) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/qlora-70b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=80, help="decoder layers (80 is the real 70B)")
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--engine", choices=["single", "fsdp", "zero3"], default="single")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more `zerotune train` flags")
    args = parser.parse_args()
    import torch

    from zerotune.bench import provenance, write_model_dir

    result = provenance("python benchmarks/gpu_70b.py " + " ".join(sys.argv[1:]))
    work = Path(args.work)
    model_dir = write_model_dir(work / "model", {**LLAMA_2_70B, "num_hidden_layers": args.layers}, torch.bfloat16,
                                saved_weights=False, seed=0)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [4 + (i * 7919 + j * 104729) % 31990 for j in range(2048)]})
                            + "\n" for i in range(args.steps + 2)))
    output = work / "run"
    engine = {"single": [], "fsdp": ["--strategy", "fsdp", "--sharded-loading"],
              "zero3": ["--strategy", "deepspeed", "--zero-stage", "3", "--sharded-loading"]}[args.engine]
    command = [sys.executable, "-c",
               "import resource, sys; from zerotune.cli import main; status = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)",
               "train", "--model", str(model_dir), "--init", "random", "--method", args.method,
               "--num-workers", str(args.workers), *engine,
               "--gradient-checkpointing", "--data", str(data), "--template", "tokens", "--max-seq-len", "2048",
               "--batch-size", "1", "--max-steps", str(args.steps), "--tracking", "none", "--eval-fraction", "0",
               "--lora-dropout", "0", "--output-dir", str(output), "--overwrite", "--quiet", *args.extra]
    node = NodeMemory()
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    node.stop()
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()] \
        if (output / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "loss" in m]
    timed = steps[2:] or steps  # the first steps include compilation and allocator warm-up
    peak_rss = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    result.update({
        "workload": f"{args.method}, Llama-2-70B architecture ({args.layers} layers), random weights, LoRA r16 "
                    f"all-linear, seq 2048, micro-batch 1 per GPU, gradient checkpointing, {args.workers} GPU(s), "
                    f"engine {args.engine}",
        "exit_status": done.returncode, "wall_seconds": time.time() - started,
        "losses": [m["loss"] for m in steps],
        "tokens_per_second": sum(m["tokens_per_second"] for m in timed) / len(timed) if timed else None,
        "peak_gpu_gib": max((m.get("peak_memory_gib", 0) for m in steps), default=None),
        "peak_host_rss_gib": int(peak_rss[0].split()[1]) / 2**20 if peak_rss else None,
        "peak_largest_process_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "peak_node_used_gib": node.peak_gib,
        "metrics": steps,
        "tail": (done.stderr or "")[-3000:] if done.returncode else "",
    })
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"{args.method}_70b_{args.engine}_x{args.workers}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=1))


if __name__ == "__main__":
    main()
