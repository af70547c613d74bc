"""SwiGLU's backward pointwise kernel (gate/up gradients from silu(gate) * up), compiled by inductor as in the
fused layer (gate and up as views of one [tokens, 2 x intermediate] output), indexed in one dimension and tiled
over rows and columns, and zerotune.speed.swiglu's Triton kernel at a few tile shapes, each timed alone against a plain
copy of the same bytes. In the W2 step this kernel is the largest after the matmuls and attention (4.5-4.7 ms per step);
run under Nsight Compute it shows whether memory or instructions bound it:

    ncu --clock-control none -k regex:triton -c 1 --metrics gpu__time_duration.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__inst_executed.sum python benchmarks/swiglu_backward.py --out DIR

Usage: python benchmarks/swiglu_backward.py --out DIR [--tokens 2048] [--intermediate 14336]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def swiglu_backward(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of silu(gate) * up with respect to out = [gate | up], as autograd's decomposition has it."""
    gate, up = out.split(out.shape[-1] // 2, -1)
    sig = torch.sigmoid(gate.float())
    grad_gate = grad.float() * up.float() * sig * (1 + gate.float() * (1 - sig))
    grad_up = grad.float() * gate.float() * sig
    return torch.cat([grad_gate.to(out.dtype), grad_up.to(out.dtype)], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=14336, help="14,336: Llama-3-8B; 11,008: Llama-2-7B")
    parser.add_argument("--tiles", default="4x1024x8,2x1024x4,8x512x8,1x2048x8,8x1024x8,16x256x4",
                        help="zerotune.speed.swiglu kernel tiles to time: ROWSxCOLUMNSxWARPS, comma-separated")
    args = parser.parse_args()
    import triton

    from zerotune.speed import swiglu
    from zerotune.bench import provenance

    result = provenance("python benchmarks/swiglu_backward.py " + " ".join(sys.argv[1:]))
    kw = dict(device="cuda", dtype=torch.bfloat16)
    out = torch.randn(args.tokens, 2 * args.intermediate, **kw)
    grad = torch.randn(args.tokens, args.intermediate, **kw)
    kernel = torch.compile(swiglu_backward)
    kernel(out, grad)  # compiled first, so that a profiler's first kernel is the backward itself
    moved = (out.numel() + grad.numel() + out.numel()) * out.element_size()  # read out and grad, write [gg | gu]

    def timed(fn) -> dict:
        ms = triton.testing.do_bench(fn, rep=200)
        return {"ms": ms, "tb_per_s": moved / ms / 1e9}

    result.update(tokens=args.tokens, intermediate=args.intermediate, inductor_1d=timed(lambda: kernel(out, grad)))
    tiled = torch.compile(swiglu_backward, options={"triton.prefer_nd_tiling": True})
    result["inductor_nd_tiled"] = timed(lambda: tiled(out, grad))
    expected = swiglu.swiglu_backward_reference(out, grad)
    result["zerotune_kernel"] = {}
    for tile in args.tiles.split(","):
        swiglu.BLOCK_ROWS, swiglu.BLOCK_COLUMNS, swiglu.NUM_WARPS = map(int, tile.split("x"))
        try:
            got = swiglu.swiglu_backward(out, grad)
            result["zerotune_kernel"][tile] = {
                **timed(lambda: swiglu.swiglu_backward(out, grad)),
                "max_abs_diff_from_torch_ops": (got.float() - expected.float()).abs().max().item()}
        except Exception as error:  # a tile Triton cannot build must not lose the others' timings
            result["zerotune_kernel"][tile] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    copy = torch.empty_like(out)
    copy_ms = triton.testing.do_bench(lambda: copy.copy_(out), rep=200)
    result.update(copy_ms=copy_ms, copy_tb_per_s=2 * out.numel() * out.element_size() / copy_ms / 1e9)
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "swiglu-backward.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
