"""The large matmuls of one decoder layer's LoRA step, each timed alone, in the shapes zerotune's fused
projections give them (LoRA matrices stacked into the frozen weight: N or K grows by the rank) and in the plain
frozen shapes, with the rank-wide matmuls that the stacking replaces, and with the stacked dimension padded
to a multiple of 64 or 128. Shows what stacking costs or saves per matmul (tile and wave quantization of the
odd sizes), outside the power and clock limits of a whole step.

Usage: python benchmarks/gemm_shapes.py --out DIR [--arch llama-3-8b] [--tokens 2048] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def cases(arch: dict, rank: int) -> list[tuple[str, int, int, int, int]]:
    """(name, K, N, members, extra) per group: the frozen matmul reads K features and writes N; stacking
    adds ``members * rank`` to K (LoRA-B in columns: q/k/v, gate/up) or to N (LoRA-A in rows: o, down)."""
    hidden, inter = arch["hidden_size"], arch["intermediate_size"]
    kv = hidden * arch["num_key_value_heads"] // arch["num_attention_heads"]
    return [("qkv", hidden, hidden + 2 * kv, 3, 0), ("gate_up", hidden, 2 * inter, 2, 0),
            ("o", hidden, hidden, 1, 1), ("down", inter, hidden, 1, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="llama-3-8b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from sdpa_backends import time_ms
    from zerotune.bench import ARCHITECTURES, provenance

    result = provenance("python benchmarks/gemm_shapes.py " + " ".join(sys.argv[1:]))
    result.update(architecture=args.arch, tokens=args.tokens, rank=args.rank, groups={})
    torch.manual_seed(0)
    t, r = args.tokens, args.rank
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for name, k, n, members, rows in cases(ARCHITECTURES[args.arch], r):
        extra = members * r
        ks, ns = (k, n + extra) if rows else (k + extra, n)  # the stacked weight is [ns, ks]
        x, w, s = torch.randn(t, k, **bf16), torch.randn(n, k, **bf16), torch.randn(ns, ks, **bf16)
        xs, grad, grads = torch.randn(t, ks, **bf16), torch.randn(t, n, **bf16), torch.randn(t, ns, **bf16)
        a, xa = torch.randn(extra, k, **bf16), torch.randn(t, extra, **bf16)
        b = torch.randn(n, extra, **bf16)
        timings = {
            "forward_plain": time_ms(lambda: torch.nn.functional.linear(x, w), args.repeats),
            "forward_stacked": time_ms(lambda: torch.nn.functional.linear(xs, s), args.repeats),
            "backward_plain": time_ms(lambda: grad @ w, args.repeats),
            "backward_stacked": time_ms(lambda: grads @ s, args.repeats),
            # what the stacking replaces or adds: x A^T, grad B (rank-wide outputs), grad_xa A (a full-size one)
            "x_at": time_ms(lambda: torch.nn.functional.linear(x, a), args.repeats),
            "grad_b": time_ms(lambda: grad @ b, args.repeats),
            "grad_xa_a": time_ms(lambda: xa @ a, args.repeats),
        }
        for multiple in (64, 128):  # the stacked dimension padded with zeros to a multiple of the tile depth
            kp, np_ = (ks, -(-ns // multiple) * multiple) if rows else (-(-ks // multiple) * multiple, ns)
            xp, sp, gp = torch.randn(t, kp, **bf16), torch.randn(np_, kp, **bf16), torch.randn(t, np_, **bf16)
            timings[f"forward_stacked_pad{multiple}"] = time_ms(lambda: torch.nn.functional.linear(xp, sp),
                                                                 args.repeats)
            timings[f"backward_stacked_pad{multiple}"] = time_ms(lambda: gp @ sp, args.repeats)
        flops = 2 * t * k * n
        row = {k_: round(v, 4) for k_, v in timings.items()}
        row.update(shape_plain=[t, k, n], shape_stacked=[t, ks, ns],
                   tflops_forward_plain=round(flops / timings["forward_plain"] / 1e9, 1),
                   tflops_forward_stacked=round(2 * t * ks * ns / timings["forward_stacked"] / 1e9, 1))
        result["groups"][name] = row
        print(name, row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gemm-shapes-{args.arch}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
