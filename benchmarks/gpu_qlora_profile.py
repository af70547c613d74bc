"""Where QLoRA micro-batch 1's step time goes, and why it varies from step to step. One GPU.

The model is the `qlora` bench workload's: Llama-2-7B architecture with random weights packed to NF4 (double
quantization, bf16 compute and storage), LoRA r16 on all linear layers, gradient checkpointing, seq 2048,
micro-batch 1, the chunked loss, fused AdamW, bf16 autocast. For each variant (``compiled``: zerotune's
decoder-layer compilation; ``compiled-nf4``: with zerotune.speed.nf4's matmul; ``...-cpp-wrapper``: inductor's
host code in C++; ``...-graphed``: the whole step (forward, backward, optimizer) captured once as a CUDA graph and
replayed; ``eager``):

1. ``--steps`` timed steps after ``--warmup`` ones. Per step: the host's enqueue time (until the last kernel of
   the step is queued) and the wall time (until the GPU is done). A step whose enqueue time is close to its
   wall time is host-bound: the GPU waited for the CPU.
2. torch.profiler over 3 steps: the GPU's busy time per step (kernel self time), the kernel count, the top
   kernels and the top CPU ops by self time.

Meanwhile ``nvidia-smi`` samples the SM clock, power and temperature every 100 ms; each variant's samples
are summarised, to tell a slow GPU from a slow host.

Usage: python benchmarks/gpu_qlora_profile.py --out DIR [--variants compiled,compiled-nf4,eager] [--steps 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


VARIANTS = {  # name: (compile the decoder layers, zerotune.speed.nf4 matmul, inductor's C++ host wrapper)
    "compiled": (True, False, False),
    "compiled-nf4": (True, True, False),
    "compiled-nf4-graphed": (True, True, False),
    "compiled-nf4-no-probe": (True, True, False),  # without transformers' packed-sequence probe (a host sync)
    "compiled-nf4-cpp-wrapper": (True, True, True),
    "compiled-cpp-wrapper": (True, False, True),
    "eager": (False, False, False),
}


def build(compiled: bool, nf4: bool):
    from transformers import LlamaConfig

    from zerotune import adapters
    from zerotune.bench import ARCHITECTURES
    from zerotune.config import AdapterConfig
    from zerotune.speed.chunked_loss import install_chunked_loss
    from zerotune.model import random_4bit_model
    from zerotune.speed.compile import compile_layers

    torch.manual_seed(0)
    model = random_4bit_model(LlamaConfig(**ARCHITECTURES["llama-2-7b"]),
                              dict(dtype=torch.bfloat16, attn_implementation="sdpa"), torch.device("cuda"),
                              torch.bfloat16)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapters.apply_method(model, AdapterConfig(method="qlora", dropout=0.0), seed=0)
    head, _ = install_chunked_loss(model)
    if nf4:
        from zerotune.speed.nf4 import install_compiled_nf4

        install_compiled_nf4(model)
    if compiled:
        compile_layers(model)
    model.train()
    return model, head


def whole_step_graph(step, warmup: int, losses: list, optimizer):
    """Capture ``step`` (forward, backward, optimizer step; built with ``capturable=True`` and without zeroing
    gradients) as one CUDA graph after ``warmup`` ordinary steps on a side stream (their losses go to
    ``losses``). Returns a function that replays it and returns the step's loss. Peak memory stats are reset
    before the capture: replays allocate nothing, so the capture's working set is the step's peak. The two
    transformers patches below stay for the rest of the process; they are exact for one-sequence rows."""
    # transformers builds a full attention mask while a CUDA stream captures (it cannot look at a padding
    # mask then); these rows have none, so the causal fast path is right, and what was compiled stays valid.
    import transformers.masking_utils as hf_masking
    import transformers.utils.import_utils as hf_import_utils

    hf_import_utils.is_cuda_stream_capturing = lambda: False
    hf_masking.find_packed_sequence_indices = lambda position_ids: None  # one sequence per row (a host sync)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            losses.append(step())
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.reset_peak_memory_stats()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_loss = step()

    def replay():
        graph.replay()
        return static_loss.clone()
    return replay


def measure(variant: str, steps: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from zerotune.step import token_loss_sum

    compiled, nf4, cpp_wrapper = VARIANTS[variant]
    torch._dynamo.reset()
    torch._inductor.config.cpp_wrapper = cpp_wrapper
    model, head = build(compiled, nf4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(4, 32000, (1, 2048), device="cuda")
    batch = {"input_ids": ids, "labels": ids}

    graphed = variant.endswith("-graphed")
    if variant.endswith("-no-probe"):  # exact for these one-sequence rows; stays for the rest of the process
        import transformers.masking_utils as hf_masking

        hf_masking.find_packed_sequence_indices = lambda position_ids: None
    if graphed:  # the step's inputs and the optimizer's state must stay at fixed addresses for replay
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True,
                                      capturable=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            loss, tokens = token_loss_sum(model, batch, head, label_count=2047)
        (loss / tokens).backward()
        optimizer.step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        return (loss / tokens).detach()

    losses = []  # every executed update's loss, in order: equal between variants if the graph replays right

    if graphed:
        step = whole_step_graph(step, warmup, losses, optimizer)
    for _ in range(warmup):
        losses.append(step())
    torch.cuda.synchronize()
    gc.collect()
    gc.freeze()
    if not graphed:
        torch.cuda.reset_peak_memory_stats()
    enqueue, wall = [], []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(step())
        enqueue.append(time.perf_counter() - started)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = sorted(((e.key, e.self_device_time_total / 3 / 1e3, e.count / 3) for e in averages
                      if e.device_type.name == "CUDA" and e.self_device_time_total > 0), key=lambda k: -k[1])
    cpu_ops = sorted(((e.key, e.self_cpu_time_total / 3 / 1e3, e.count / 3) for e in averages
                      if e.self_cpu_time_total > 0), key=lambda k: -k[1])
    gc.unfreeze()
    return {
        "variant": variant,
        "wall_s": wall, "enqueue_s": enqueue,
        "wall_median_s": statistics.median(wall), "wall_min_s": min(wall), "wall_max_s": max(wall),
        "enqueue_median_s": statistics.median(enqueue),
        "tokens_per_second_median": 2048 / statistics.median(wall),
        "peak_gib": peak,
        "reserved_gib": torch.cuda.memory_reserved() / 2**30,
        "losses": [round(float(x), 5) for x in losses],
        "gpu_busy_ms_per_step": sum(ms for _, ms, _ in kernels),
        "kernels_per_step": sum(n for _, _, n in kernels),
        "top_kernels_ms_count": [[k[:100], round(ms, 3), round(n, 1)] for k, ms, n in kernels[:20]],
        "top_cpu_ops_ms_count": [[k[:100], round(ms, 3), round(n, 1)] for k, ms, n in cpu_ops[:25]],
    }


def gpu_samples(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append({"t": float(parts[0]), "sm_mhz": float(parts[1]), "watts": float(parts[2]),
                         "celsius": float(parts[3]), "util": float(parts[4])})
        except (ValueError, IndexError):
            continue
    return rows


def summarise(rows: list[dict], start: float, end: float) -> dict:
    inside = [r for r in rows if start <= r["t"] <= end and r["util"] > 0]
    if not inside:
        return {}
    pick = lambda key: [r[key] for r in inside]  # noqa: E731
    return {"samples": len(inside), "sm_mhz_min": min(pick("sm_mhz")), "sm_mhz_median": statistics.median(pick("sm_mhz")),
            "watts_max": max(pick("watts")), "celsius_max": max(pick("celsius")),
            "util_median": statistics.median(pick("util"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="compiled,compiled-nf4,eager", help=", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    args = parser.parse_args()
    from zerotune.bench import provenance

    result = provenance("python benchmarks/gpu_qlora_profile.py " + " ".join(sys.argv[1:]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "qlora_profile.json"
    samples = Path(args.out) / "nvidia-smi.csv"
    sampler = subprocess.Popen(
        ["bash", "-c", "while true; do printf '%s, ' $(date +%s.%N); nvidia-smi -i 0 "
         "--query-gpu=clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader,nounits; "
         "sleep 0.1; done"], stdout=samples.open("w"), stderr=subprocess.DEVNULL)
    result["variants"] = []
    try:
        for variant in args.variants.split(","):
            started = time.time()
            try:
                measured = measure(variant, args.steps, args.warmup)
            except Exception as error:  # one variant failing must not lose the others' numbers
                import traceback

                measured = {"variant": variant, "error": f"{type(error).__name__}: {str(error)[:800]}",
                            "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            torch.cuda.empty_cache()
            measured["gpu_while_timed"] = summarise(gpu_samples(samples), started, time.time())
            result["variants"].append(measured)
            out.write_text(json.dumps(result, indent=1))
            brief = {k: v for k, v in measured.items() if k not in ("wall_s", "enqueue_s", "top_cpu_ops_ms_count", "losses")}
            print(json.dumps(brief, indent=1), flush=True)
    finally:
        sampler.kill()


if __name__ == "__main__":
    main()
