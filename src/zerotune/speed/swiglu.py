"""SwiGLU, silu(gate) * up, with its backward as one Triton kernel on CUDA GPUs.

In a fused LoRA step (fused_projections: gate and up come out of one matmul as one [tokens, 2 x intermediate]
tensor) SwiGLU's backward is the largest kernel after the matmuls and attention. Inductor compiles it from
autograd's pieces (mul, silu's backward, the split's cat) into one pointwise kernel that, under Nsight Compute,
ran instruction-bound rather than memory-bound (benchmarks/results/*-swiglu-backward-ncu.json). The kernel here
reads gate, up and the output's gradient once, computes both gradients in fp32 and writes them into one
[gate | up] tensor, the layout the fused gate/up matmul's backward reads.

``silu_mul(gate_up)`` is the autograd-visible function: its forward is plain torch ops (the compiler fuses them
with their neighbours), its backward is the custom op ``zerotune::swiglu_backward``, whose CUDA kernel is the
Triton one and whose other devices run the same formula in torch ops (CPU, and GPUs without Triton).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the torch-ops formula runs
    triton = None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on its last dimension."""
    return _SiluMul.apply(gate_up)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, -1)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad)


@torch.library.custom_op("zerotune::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of silu(gate) * up with respect to gate_up = [gate | up], given the output's gradient:
    [grad * up * silu'(gate) | grad * silu(gate)], computed in fp32 (or fp64), returned in gate_up's dtype."""
    return swiglu_backward_reference(gate_up, grad)


def swiglu_backward_reference(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """swiglu_backward in torch ops (silu'(g) = sig(g) (1 + g (1 - sig(g))) = sig(g) + silu(g) (1 - sig(g)))."""
    compute = torch.promote_types(gate_up.dtype, torch.float32)  # fp32 for 16-bit tensors; fp64 stays fp64
    gate, up = gate_up.to(compute).chunk(2, -1)
    grad = grad.to(compute)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    return torch.cat([grad * up * (sig + silu * (1 - sig)), grad * silu], -1).to(gate_up.dtype)


@swiglu_backward.register_fake
def _(gate_up, grad):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


@swiglu_backward.register_kernel("cuda")
def _(gate_up, grad):
    if triton is None or gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return swiglu_backward_reference(gate_up, grad)
    width = gate_up.shape[-1] // 2
    gate_up_rows = gate_up.reshape(-1, 2 * width)
    grad_rows = grad.reshape(-1, width)
    if gate_up_rows.stride(-1) != 1 or grad_rows.stride(-1) != 1:
        gate_up_rows, grad_rows = gate_up_rows.contiguous(), grad_rows.contiguous()
    out = torch.empty(gate_up_rows.shape, dtype=gate_up.dtype, device=gate_up.device)
    rows = out.shape[0]
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(width, BLOCK_COLUMNS))
    _swiglu_backward_kernel[grid](gate_up_rows, grad_rows, out, rows, width, gate_up_rows.stride(0),
                                  grad_rows.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS,
                                  num_warps=NUM_WARPS)
    return out.reshape(gate_up.shape)


# A program's tile: 2 rows x 1,024 columns, four warps (on an H200, benchmarks/swiglu_backward.py: 77-78 us for
# 2,048 x 14,336, 3.8 TB/s, against 3.0 for inductor's nd-tiled kernel; other tiles of four warps within 1%, eight
# warps at 4 x 1,024 took 110 us)
BLOCK_ROWS, BLOCK_COLUMNS, NUM_WARPS = 2, 1024, 4

if triton is not None:
    @triton.jit
    def _swiglu_backward_kernel(gate_up_ptr, grad_ptr, out_ptr, rows, width, gate_up_stride, grad_stride,
                                BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)[None, :]
        mask = (row < rows) & (column < width)
        row = row.to(tl.int64)
        gate_at = gate_up_ptr + row * gate_up_stride + column
        gate = tl.load(gate_at, mask=mask).to(tl.float32)
        up = tl.load(gate_at + width, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + row * grad_stride + column, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        out_at = out_ptr + row * (2 * width) + column
        tl.store(out_at, (grad * up * (sig + silu * (1 - sig))).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_at + width, (grad * silu).to(out_ptr.dtype.element_ty), mask=mask)
