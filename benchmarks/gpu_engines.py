"""GPU verification of the engines on a Llama-2-7B-architecture model with random bf16 weights.

Runs the real `zerotune train` CLI for each engine at one global batch (8 rows of 2048 tokens), LoRA r16
on all linear layers, gradient checkpointing, and records per-GPU tokens/s, peak memory and per-step losses.
This is a verification run of zerotune's own engines (workload W4's shape), not a same-run comparison with
the HF baselines in ANCHORS.md.

Usage (on a 2-GPU machine): python benchmarks/gpu_engines.py --out DIR [--engines fsdp,ddp,...] [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL_JSON = ROOT / "examples" / "deepspeed_tutorial_zero3_offload.json"

ENGINES = {
    "single": ["--num-workers", "1", "--grad-accum", "2"],
    "ddp": ["--num-workers", "2", "--strategy", "ddp"],
    "fsdp": ["--num-workers", "2", "--strategy", "fsdp"],
    "zero3": ["--num-workers", "2", "--strategy", "deepspeed", "--zero-stage", "3"],
    "tutorial_json": ["--num-workers", "2", "--deepspeed", str(TUTORIAL_JSON)],
    # ZeRO-3 as DeepSpeed hooks it by default, a module at a time (zerotune gathers a decoder layer at a time)
    "zero3_module": ["--num-workers", "2", "--strategy", "deepspeed", "--zero-stage", "3", "--zero3-fetch", "module"],
    "tutorial_json_module": ["--num-workers", "2", "--deepspeed", str(TUTORIAL_JSON), "--zero3-fetch", "module"],
    "auto": ["--num-workers", "2"],
    "ddp4": ["--num-workers", "4", "--strategy", "ddp"],
    "fsdp4": ["--num-workers", "4", "--strategy", "fsdp"],
    "zero2": ["--num-workers", "2", "--strategy", "deepspeed", "--zero-stage", "2"],
    # ZeRO-3 with larger prefetch and persistence for every tensor under 50M elements: for a 7B Llama that
    # keeps every per-layer matrix resident and shards only the embeddings and head (close to ZeRO-2).
    "zero3_tuned": ["--num-workers", "2", "--deepspeed", "/tmp/zerotune-gpu/zero3_tuned.json"],
    "ray_fsdp": ["--num-workers", "2", "--launcher", "ray", "--strategy", "fsdp"],
}


def build_model(directory: Path) -> None:
    import torch

    from zerotune.tiny import build_model as build, build_tokenizer

    tokenizer = build_tokenizer([", ".join(str(i) for i in range(3000))] * 4, vocab_size=400)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = build("llama", 32000, hidden_size=4096, layers=32, heads=32, intermediate_size=11008)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def build_data(path: Path) -> None:
    """Rows long enough to fill 2048 tokens: counting from a random start, truncated at max_seq_len."""
    import random

    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(256):
            start = rng.randint(1, 500)
            handle.write(json.dumps({"instruction": f"Count from {start}.",
                                     "output": ", ".join(str(i) for i in range(start, start + 2000))}) + "\n")


def run_hf_baseline(model: Path, out: Path, steps: int) -> dict:
    """transformers + PEFT + DeepSpeed ZeRO-3 on 2 GPUs (benchmarks/hf_deepspeed_baseline.py)."""
    result = out / "hf_zero3.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(ROOT / "benchmarks" / "hf_deepspeed_baseline.py"), "--model", str(model), "--steps", str(steps),
               "--out", str(result)]
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    record = {"engine": "hf_zero3_baseline", "command": " ".join(command[1:]), "returncode": completed.returncode,
              "wall_seconds": round(time.time() - started, 1), "strategy": "transformers+peft+deepspeed zero3"}
    if completed.returncode != 0:
        record["error_tail"] = completed.stderr[-3000:]
        return record
    record.update(json.loads(result.read_text()))
    return record


def run_engine(name: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    if name == "hf_zero3":
        return run_hf_baseline(model, out, steps)
    command = [sys.executable, "-m", "zerotune", "train", "--model", str(model), "--data", str(data),
               "--output-dir", str(out / name), "--tracking", "none", "--max-steps", str(steps), "--batch-size", "4",
               "--max-seq-len", "2048", "--gradient-checkpointing", "--dtype", "bf16", "--eval-fraction", "0",
               "--lr", "1e-4", "--quiet", *ENGINES[name]]
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True)
    record = {"engine": name, "command": " ".join(command[1:]), "returncode": completed.returncode,
              "wall_seconds": round(time.time() - started, 1)}
    if completed.returncode != 0:
        record["error_tail"] = completed.stderr[-3000:]
        return record
    events = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "loss" in e]
    workers = 1 if name == "single" else 4 if name.endswith("4") else 2
    saved = json.loads((out / name / "adapter" / "zerotune.json").read_text())
    record.update(strategy=saved["strategy"], adapter_mib=round(
        (out / name / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20, 1))
    timed = [e["tokens_per_second"] for e in train[2:]]  # the first two steps include warm-up
    record.update(losses=[e["loss"] for e in train], workers=workers,
                  tokens_per_second_per_gpu=statistics.median(timed) / workers,
                  peak_gib_rank0=max(e.get("peak_memory_gib", 0) for e in train))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--engines", default="fsdp,ddp,zero3,single,tutorial_json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--name", default="run", help="suffix of the results file")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/zerotune-gpu")
    work.mkdir(exist_ok=True)
    model, data = work / "llama2-7b-random", work / "long.jsonl"
    if not (model / "config.json").exists():
        build_model(model)
    build_data(data)
    (work / "zero3_tuned.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 2e8,
                              "stage3_param_persistence_threshold": 5e7, "stage3_max_live_parameters": 3e9}}))
    from zerotune.bench.harness import commit as current_commit

    commit = current_commit()  # ZEROTUNE_COMMIT first: the GPU box's copy of .git can lag the working tree
    results = {"workload": "W4-shape engines verification (Llama-2-7B arch, LoRA r16 all-linear, mb4, seq 2048, ckpt)",
               "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
               "date": datetime.date.today().isoformat(), "commit": commit,
               "command": "python benchmarks/gpu_engines.py " + " ".join(sys.argv[1:]), "runs": []}
    for name in args.engines.split(","):
        record = run_engine(name, model, data, work / "runs", args.steps)
        results["runs"].append(record)
        (out / f"gpu_engines_{args.name}.json").write_text(json.dumps(results, indent=1))
        summary = {k: record.get(k) for k in ("engine", "strategy", "adapter_mib", "returncode", "tokens_per_second_per_gpu", "peak_gib_rank0",
                                               "wall_seconds")}
        print(json.dumps(summary), record.get("losses", [])[:3], flush=True)
        if record["returncode"] != 0:
            print(record["error_tail"][-1500:], flush=True)


if __name__ == "__main__":
    main()
