"""SDPA's attention kernels (flash, cuDNN, memory-efficient) on the bench workloads' attention shapes, one GPU:
forward+backward milliseconds per layer and each backend's largest difference from an fp32 reference.

Shapes: seq 2048, head dim 128, bf16, causal; Llama-2-7B (32 query and 32 key/value heads) and Llama-3-8B
(32 and 8, once with enable_gqa as transformers passes it, once with the key/value heads repeated).

Usage: python benchmarks/sdpa_backends.py --out DIR [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = {"llama-2-7b": (32, 32, False), "llama-3-8b-gqa": (32, 8, True), "llama-3-8b-repeated": (32, 8, False)}


def inputs(heads: int, kv_heads: int, gqa: bool, batch: int, seq: int, dim: int = 128):
    generator = torch.Generator("cuda").manual_seed(0)

    def make(n):
        return torch.randn(batch, n, seq, dim, device="cuda", generator=generator, dtype=torch.bfloat16)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    grad = make(heads)
    if not gqa and kv_heads != heads:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    return q, k, v, grad


def forward_backward(q, k, v, grad, gqa: bool):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for sdpa-backends.json")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward+backward calls per backend")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (W1/W2: 1, W1-ckpt: 4)")
    args = parser.parse_args()
    from zerotune.bench import provenance

    result = provenance("python benchmarks/sdpa_backends.py " + " ".join(sys.argv[1:]))
    result["shapes"] = {}
    for shape, (heads, kv_heads, gqa) in SHAPES.items():
        q, k, v, grad = inputs(heads, kv_heads, gqa, args.batch, 2048)
        with sdpa_kernel(SDPBackend.MATH):
            reference = forward_backward(q.float(), k.float(), v.float(), grad.float(), gqa)
        rows = {}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    got = forward_backward(q, k, v, grad, gqa)
                    ms = time_ms(lambda: forward_backward(q, k, v, grad, gqa), args.repeats)
                rows[name] = {"fwd_bwd_ms": round(ms, 4),
                              "max_abs_diff": {part: float((g.float() - r).abs().max())
                                               for part, g, r in zip(("out", "dq", "dk", "dv"), got, reference)}}
            except RuntimeError as error:  # a backend that does not take this shape
                rows[name] = {"error": str(error).splitlines()[0][:300]}
            print(shape, name, rows[name], flush=True)
        result["shapes"][shape] = rows
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sdpa-backends.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
