"""Where W1's step time goes, and how much host RAM loading a 7B model takes. One GPU.

1. torch.profiler over 3 steps of zerotune's path on W1 (Llama-2-7B arch, random bf16 weights, LoRA r16
   all-linear, seq 2048, mb 1, compiled decoder layers, chunked loss), after 4 warm-up steps: the top CUDA
   kernels by total time, grouped into matmul / attention / other.
2. `zerotune train` on a saved random Llama-2-7B (13.5 GB of safetensors), 2 steps: its peak host RSS.

Usage: python benchmarks/gpu_profile_and_memory.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def profile_w1() -> dict:
    from zerotune import adapters
    from zerotune.bench import ARCHITECTURES
    from zerotune.config import AdapterConfig
    from zerotune.speed.chunked_loss import install_chunked_loss
    from zerotune.speed.compile import compile_layers
    from zerotune.step import token_loss_sum
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES["llama-2-7b"])).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model = adapters.apply_method(model, AdapterConfig(dropout=0.0), seed=0)
    head, _ = install_chunked_loss(model)
    compile_layers(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(4, 32000, (1, 2048), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as zerotune runs it (model.mixed_precision)
            loss, tokens = token_loss_sum(model, batch, head)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    import time

    started = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) / 10 * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.self_device_time_total / 3 / 1e3) for e in prof.key_averages()
                      if e.device_type.name == "CUDA" and e.self_device_time_total > 0), key=lambda kv: -kv[1])
    total = sum(ms for _, ms in kernels)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in kernels:
        low = name.lower()
        kind = "attention" if ("flash" in low or "attention" in low or "fmha" in low) else \
            "matmul" if ("gemm" in low or "nvjet" in low or "cutlass" in low or "matmul" in low) else "other"
        groups[kind] += ms
    return {"gpu_ms_per_step": total, "wall_ms_per_step_unprofiled": wall_ms, "by_group_ms": groups,
            "top_kernels_ms": [[name[:120], round(ms, 3)] for name, ms in kernels[:30]],
            "note": "self device time per step; the step's wall time also includes launch gaps"}


def host_rss_of_train(work: Path) -> dict:
    from zerotune.bench import ARCHITECTURES, write_model_dir

    model_dir = write_model_dir(work / "model", ARCHITECTURES["llama-2-7b"], torch.bfloat16, saved_weights=True,
                                seed=0)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(4, 2052))}) + "\n" for _ in range(4)))
    command = [sys.executable, "-c",
               "import resource, sys; from zerotune.cli import main; status = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)",
               "train", "--model", str(model_dir), "--data", str(data), "--template", "tokens", "--max-seq-len",
               "2048", "--batch-size", "1", "--max-steps", "2", "--tracking", "none", "--eval-fraction", "0",
               "--output-dir", str(work / "run"), "--overwrite", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    safetensors = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {"exit_status": done.returncode, "weights_on_disk_gib": safetensors / 2**30,
            "peak_host_rss_gib": int(peak[0].split()[1]) / 2**20 if peak else None,
            "tail": (done.stderr or "")[-1500:] if done.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/profile-work")
    parser.add_argument("--skip-host-memory", action="store_true", help="only the profile")
    args = parser.parse_args()
    from zerotune.bench import provenance

    result = provenance("python benchmarks/gpu_profile_and_memory.py " + " ".join(sys.argv[1:]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "profile_and_memory.json"
    result["w1_profile"] = profile_w1()
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["w1_profile"], indent=1)[:4000], flush=True)
    torch.cuda.empty_cache()
    if args.skip_host_memory:
        return
    result["host_memory_7b"] = host_rss_of_train(Path(args.work))
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["host_memory_7b"], indent=1), flush=True)


if __name__ == "__main__":
    main()
