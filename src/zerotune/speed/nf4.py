"""QLoRA's 4-bit matmul written in torch ops, so torch.compile fuses it.

bitsandbytes packs and stores the NF4 weights (``Params4bit`` and its ``QuantState``); only the matmul moves.
Its ``MatMul4Bit`` calls a custom op per weight, and each call runs bitsandbytes' Python wrapper and a ctypes
launch on the host. At micro-batch 1 a QLoRA step is host-bound (benchmarks/gpu_qlora_profile.py: the GPU
is busy 57% of a compiled step), so that per-call host time is step time. Written as torch ops, the
dequantization (two nibbles per byte, the NF4 table, the double-quantized block scales) is traced into the
compiled decoder layer: Inductor makes one fused kernel of it per weight, launched from its generated code.

Same values as bitsandbytes: the same float32 products, cast to the compute dtype once
(tests/test_nf4.py compares with ``bitsandbytes.functional.dequantize_4bit`` bit for bit, and the layer's
outputs and input gradients with bitsandbytes' own forward). The backward dequantizes again, through
bitsandbytes' kernel (see ``_Linear4bit.backward``), rather than keeping the full-precision weight: saved for
backward are the packed bytes and their scales, as in bitsandbytes.

Installed per ``Linear4bit`` by replacing its forward (``install_compiled_nf4``), once, so the training step
does not re-check each layer's state. Layers whose state this path does not cover (FP4, no double
quantization with 256-entry blocks, a CPU inference repack) keep the original forward. So do rows whose width is not a multiple of the 64-weight block (none in the supported
families).
"""

from __future__ import annotations

import types

import torch


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values [n] float32 times scales[i // blocksize], the last block possibly short."""
    n = values.numel()
    padded = scales.numel() * blocksize
    if padded != n:
        values = torch.nn.functional.pad(values, (0, padded - n))
    return (values.view(-1, blocksize) * scales.view(-1, 1)).reshape(-1)[:n]


def block_scales(absmax_q: torch.Tensor, absmax_code: torch.Tensor, absmax_scales: torch.Tensor,
                 offset: torch.Tensor, absmax_blocksize: int) -> torch.Tensor:
    """The float32 scale of each block of 64 weights, from its 8-bit double quantization."""
    return _blockwise(absmax_code[absmax_q.long()], absmax_scales, absmax_blocksize) + offset


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
                   absmax_scales: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int,
                   absmax_blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight in ``dtype`` from bitsandbytes' double-quantized NF4 state."""
    n = shape[0] * shape[1]
    raw = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=-1).reshape(-1)[:n]  # the first value is the high nibble
    absmax = block_scales(absmax_q, absmax_code, absmax_scales, offset, absmax_blocksize)
    return _blockwise(code[nibbles.long()], absmax, blocksize).view(shape).to(dtype)


class _Linear4bit(torch.autograd.Function):
    """y = x @ W^T + bias with W dequantized on the fly; the backward gives x's gradient only (W is frozen)."""

    @staticmethod
    def forward(ctx, x, packed, absmax_q, absmax_code, absmax_scales, offset, code, bias, layout):
        weight = dequantize_nf4(packed, absmax_q, absmax_code, absmax_scales, offset, code, *layout)
        ctx.save_for_backward(packed, absmax_q, absmax_code, absmax_scales, offset, code)
        ctx.layout = layout
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        # bitsandbytes' own dequantization kernel here, not dequantize_nf4: under checkpointing a compiled
        # layer's backward graph holds the recomputed forward too. AOTAutograd merged the two identical
        # dequantizations of each weight (+0.3 GiB peak on a 7B QLoRA); written differently, inductor computed
        # both in one kernel (+0.15 GiB). Either way the copy lived from the recompute to its gradient matmul.
        # An opaque op runs in place, just before its matmul.
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, absmax_q, absmax_code, absmax_scales, offset, _ = ctx.saved_tensors
            blocksize, absmax_blocksize, shape, dtype = ctx.layout
            absmax = block_scales(absmax_q, absmax_code, absmax_scales, offset, absmax_blocksize)
            weight = torch.ops.bitsandbytes.dequantize_4bit.default(packed.reshape(-1, 1), absmax, blocksize, "nf4",
                                                                    list(shape), dtype)
            grad_x = grad_out @ weight.to(grad_out.dtype)
        return grad_x, None, None, None, None, None, None, None, None


def _state_of(module):
    weight = module.weight
    return getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)


def covered(module) -> bool:
    """Whether this Linear4bit's state is one ``dequantize_nf4`` reproduces exactly."""
    state = _state_of(module)
    return (state is not None and state.quant_type == "nf4" and state.nested and state.state2.blocksize == 256
            and len(state.shape) == 2 and state.shape[1] % state.blocksize == 0  # CPU kernel: see tests/test_nf4.py
            and not getattr(state, "packing_format_for_cpu", False) and module.weight.device.type != "meta")


def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    state = _state_of(self)
    dtype = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    layout = (state.blocksize, state.state2.blocksize, tuple(state.shape), dtype)
    out = _Linear4bit.apply(x.to(dtype), self.weight, state.absmax, state.state2.code, state.state2.absmax,
                            state.offset, state.code, bias, layout)
    return out.to(x.dtype)


def matches_bitsandbytes(device: torch.device) -> bool:
    """A 128x128 weight packed by the installed bitsandbytes on ``device``: does ``dequantize_nf4`` give its
    dequantization bit for bit? Guards against a bitsandbytes release that changes the NF4 layout."""
    import bitsandbytes as bnb

    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)).to(device)
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    expected = bnb.functional.dequantize_4bit(packed, state).to(torch.float32)
    ours = dequantize_nf4(packed, state.absmax, state.state2.code, state.state2.absmax, state.offset, state.code,
                          state.blocksize, state.state2.blocksize, tuple(state.shape), torch.float32)
    return torch.equal(ours, expected)


def install_compiled_nf4(model: torch.nn.Module) -> int:
    """Route every bitsandbytes ``Linear4bit`` of ``model`` through ``_Linear4bit``. Returns how many: none when
    the installed bitsandbytes packs NF4 in a layout ``dequantize_nf4`` does not reproduce."""
    import bitsandbytes as bnb

    devices = {m.weight.device for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not all(matches_bitsandbytes(device) for device in devices):
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and covered(module) and not hasattr(module, "_zerotune_bnb_forward"):
            module._zerotune_bnb_forward = module.forward
            module.forward = types.MethodType(_compiled_forward, module)
            count += 1
    return count
