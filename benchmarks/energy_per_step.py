"""Whether a `zerotune bench` step is bound by the GPU's power cap, and how far its energy is above the floor
of the matrix work it must do, one GPU. Samples NVML (board power, SM clock, the energy counter) every few
milliseconds while it runs, in order:

1. ``reference``: one large bf16 matmul (8192^3) repeated: the GPU's TFLOP/s and picojoules per FLOP at its cap.
2. ``gemm_floor``: the large matmuls of one LoRA step of the workload's architecture (every layer's frozen
   projections forward and backward, the output head both ways; random data, distinct weights per layer), in
   the plain frozen shapes and in the stacked, padded shapes zerotune's fused projections run; then the same
   with every layer's causal attention forward and backward (SDPA, cuDNN first); under gradient checkpointing
   (W1-ckpt) with the forwards the compiled backward recomputes. Milliseconds, watts and joules per
   step-equivalent: the tensor-core work that no fusion removes. (The stacked shapes are what zerotune runs
   without checkpointing; with it, the plain ones.)
3. ``bench``: `zerotune bench WORKLOAD` itself (the HF+PEFT baseline, then ours), each side's steady timed
   steps: milliseconds, watts, SM clock and joules per step. Its usual result JSON is written too.

If our step draws the cap and its joules are close to the floor's, only less matrix work (fewer FLOPs, lower
precision) makes it faster; removing memory-bound kernels then mostly lets the power controller lower the
clock.

Usage: python benchmarks/energy_per_step.py --out DIR [--workload w2] [--steps 24] [--warmup-steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zerotune.bench.power import PowerSampler


def timed(sampler: PowerSampler, fn, seconds: float, flops: float) -> dict:
    """Repeat ``fn`` (one step-equivalent) for about ``seconds`` after a warm-up: ms per call, watts, joules."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    begin = time.time()
    fn()
    torch.cuda.synchronize()
    repeats = max(3, int(seconds / (time.time() - begin)))
    start = time.time()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    end = time.time()
    seconds_per_call = (end - start) / repeats
    # past the first 30%, where the power controller settles
    power = sampler.window(start + 0.3 * (end - start), end, seconds_per_call) or {}
    row = {"ms": round(seconds_per_call * 1e3, 2), "tflops": round(flops / seconds_per_call / 1e12, 1), **power}
    if "joules_per_step" in power:
        row["picojoules_per_flop"] = round(power["joules_per_step"] / flops * 1e12, 3)
    return row


def step_matmuls(arch: dict, tokens: int, rank: int, stacked: bool, pad_to: int,
                 recompute: bool = False) -> tuple[list, float]:
    """One step's large matmuls as (a, b, out) triples for torch.mm, and their FLOPs: per layer and group, the
    forward y = x W^T and the backward's input gradient g W, in the plain or the stacked padded shapes; then
    the output head forward and backward. With ``recompute`` (gradient checkpointing inside the compiled
    layer) every group's forward but down_proj's runs twice, as the compiled backward recomputes it. Weights
    are distinct per layer; activations are shared buffers."""
    from gemm_shapes import cases

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    calls, flops = [], 0.0
    buffers: dict[tuple, torch.Tensor] = {}

    def buffer(role, *shape):  # inputs are never written, so the data stays random and finite
        if (role, shape) not in buffers:
            buffers[role, shape] = torch.randn(*shape, **bf16)
        return buffers[role, shape]

    def pad(size):
        return -(-size // pad_to) * pad_to

    for _ in range(arch["num_hidden_layers"]):
        for name, k, n, members, rows in cases(arch, rank):
            if stacked:
                k, n = (k, pad(n + members * rank)) if rows else (pad(k + members * rank), n)
            weight = torch.randn(n, k, **bf16) * 0.02
            forwards = 2 if recompute and name != "down" else 1
            calls += [(buffer("in", tokens, k), weight.t(), buffer("out", tokens, n))] * forwards
            calls.append((buffer("in", tokens, n), weight, buffer("out", tokens, k)))
            flops += (1 + forwards) * 2 * tokens * k * n
    head = torch.randn(arch["vocab_size"], arch["hidden_size"], **bf16) * 0.02
    calls += [(buffer("in", tokens, arch["hidden_size"]), head.t(), buffer("out", tokens, arch["vocab_size"])),
              (buffer("in", tokens, arch["vocab_size"]), head, buffer("out", tokens, arch["hidden_size"]))]
    flops += 2 * 2 * tokens * arch["hidden_size"] * arch["vocab_size"]
    return calls, flops


def attention_inputs(arch: dict, batch: int, seq: int, recompute: bool):
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    dim = arch["hidden_size"] // heads
    make = lambda n: torch.randn(batch, n, seq, dim, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, grad = make(heads).requires_grad_(), make(kv_heads).requires_grad_(), make(kv_heads).requires_grad_(), \
        make(heads)
    # QK^T and PV, causal: forward 1, backward 2.5 (and a recomputed forward under checkpointing)
    causal_flops = (4.5 if recompute else 3.5) * 2 * 2 * batch * seq * seq * dim * heads / 2
    return (q, k, v, grad), causal_flops


def gemm_floor(sampler: PowerSampler, arch: dict, batch: int, seq: int, recompute: bool, seconds: float) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zerotune.speed.fused_projections import PAD_TO

    rows = {}
    (q, k, v, grad), attention_flops = attention_inputs(arch, batch, seq, recompute)
    layers = arch["num_hidden_layers"]
    gqa = k.shape[1] != q.shape[1]

    def attention():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            for _ in range(layers):
                if recompute:
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                torch.autograd.grad(out, (q, k, v), grad)

    for name, stacked in (("plain", False), ("stacked", True)):
        calls, flops = step_matmuls(arch, batch * seq, 16, stacked, PAD_TO, recompute)

        def matmuls():
            for a, b, out in calls:
                torch.mm(a, b, out=out)

        rows[f"matmuls_{name}"] = timed(sampler, matmuls, seconds, flops)
        if stacked != recompute:  # the shapes zerotune runs: stacked, except under checkpointing (no fusion there)
            rows[f"matmuls_{name}_and_attention"] = timed(sampler, lambda: (matmuls(), attention()), seconds,
                                                          flops + layers * attention_flops)
        rows[f"matmuls_{name}"]["flops"] = flops
        print(name, rows[f"matmuls_{name}"], flush=True)
        del calls
        torch.cuda.empty_cache()
    rows["attention"] = timed(sampler, attention, seconds, layers * attention_flops)
    return rows


def bench_with_power(workload: str, steps: int, warmup: int, out: str) -> dict:
    """`zerotune bench` itself; it records each side's watts, SM clock and joules per step over its timed steps."""
    from zerotune import bench

    command = f"zerotune bench {workload} --steps {steps} --warmup-steps {warmup} (inside energy_per_step.py)"
    result = bench.run_bench(workload, steps=steps, warmup=warmup, out_dir=out, command=command)
    return {"result_file": Path(result["path"]).name, "ratio": result["ratio"],
            "median_step_ratio": result["median_step_ratio"],
            "baseline_step_spread": result["baseline"]["step_spread"],
            **{side: {"ms_per_step_mean": round(statistics.mean(result[side]["step_seconds"]) * 1e3, 2),
                      **(result[side].get("power") or {})} for side in ("baseline", "ours")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", default="w2")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="how long each floor measurement repeats")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    from zerotune import bench

    workload = bench.WORKLOADS[args.workload]
    arch = bench.ARCHITECTURES[workload.architecture]
    result = bench.provenance("python benchmarks/energy_per_step.py " + " ".join(sys.argv[1:]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with PowerSampler(period=0.005) as sampler:
        if not sampler.available:
            sys.exit("NVML (pynvml, an NVIDIA driver) is needed to read the GPU's power")
        result["power_limit_watts"] = sampler.limit_watts
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        result["reference"] = timed(sampler, lambda: [torch.mm(a, b, out=c) for _ in range(20)], args.seconds,
                                    20 * 2 * 8192**3)
        print("reference", result["reference"], flush=True)
        del a, b, c
        result["gemm_floor"] = gemm_floor(sampler, arch, workload.micro_batch, workload.seq_len,
                                          workload.checkpointing, args.seconds)
        torch.cuda.empty_cache()
        if not args.skip_bench:
            result["bench"] = bench_with_power(args.workload, args.steps, args.warmup_steps, args.out)
    path = Path(args.out) / f"energy-per-step-{args.workload}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("gemm_floor", "bench")}, indent=1))


if __name__ == "__main__":
    main()
