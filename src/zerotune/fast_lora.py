"""A cheaper LoRA update: one autograd node per adapted layer instead of PEFT's chain of small ops.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate modules and ops: the scaling
is a full-size multiply of the [tokens, out] update, the sum is another full-size pass, and the backward
pass repeats both. Here the update is added inside the GEMM (``addmm`` with beta=1) and the scaling is
applied to the rank-r intermediates ([tokens, r], 16 columns at r=16) in both directions, so no extra
full-size pass exists. The base layer is still called as a module (bf16 Linear, bitsandbytes 4-bit, or
anything an engine wrapped), and so is dropout; only the adapter's two matmuls move into the function.

Same numerics as PEFT's path: x @ A^T and (x A^T) @ B^T in the compute dtype (autocast's, or the adapter
weights' when autocast is off, as PEFT casts x to them), gradients returned in the adapter weights' dtype.
Tested against PEFT in fp64 (outputs and every gradient) in tests/test_fast_lora.py.

Installed per module by replacing its forward; the original stays reachable and is used whenever the module
is in a state this path does not cover (adapters disabled or merged, several active adapters, DoRA and other
variants, per-row adapter names, a LoRA bias).
"""

from __future__ import annotations

import types

import torch


class _LoraUpdate(torch.autograd.Function):
    """out = base_out + scaling * (x @ A^T) @ B^T, with x already through dropout."""

    @staticmethod
    def forward(ctx, base_out, x, weight_a, weight_b, scaling, compute_dtype):
        shape = base_out.shape
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        a, b = weight_a.to(compute_dtype), weight_b.to(compute_dtype)
        xa = x2 @ a.t()  # [tokens, r]
        base2 = base_out.reshape(-1, shape[-1])
        if base_out.dtype == compute_dtype:  # the update is added in the GEMM's epilogue
            out = torch.addmm(base2, xa, b.t(), alpha=scaling)
        else:  # as PEFT: the update in the adapter's dtype, the sum cast back to the base output's
            out = torch.addmm(base2.to(compute_dtype), xa, b.t(), alpha=scaling).to(base_out.dtype)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        ctx.x_shape = x.shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        grad_x = grad_a = grad_b = None
        gb = (g @ b) * ctx.scaling  # [tokens, r]: the scaling lands on r columns, not on out
        if ctx.needs_input_grad[1]:
            grad_x = (gb @ a).to(x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ x2).to(a_dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ (xa * ctx.scaling)).to(b_dtype)
        return grad_out, grad_x, grad_a, grad_b, None, None


def _fast_forward(self, x, *args, **kwargs):
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(name, False)):
        return self._zerotune_peft_forward(x, *args, **kwargs)
    base_out = self.base_layer(x)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight_a.dtype
    return _LoraUpdate.apply(base_out, self.lora_dropout[name](x), weight_a, weight_b, self.scaling[name], dtype)


def install_fast_lora(model: torch.nn.Module) -> int:
    """Route every PEFT LoRA Linear of ``model`` through the fused update. Returns how many were switched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear or (isinstance(module, LoraLinear) and hasattr(module, "base_layer")):
            if hasattr(module, "_zerotune_peft_forward"):
                continue
            module._zerotune_peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def uninstall_fast_lora(model: torch.nn.Module) -> None:
    for module in model.modules():
        original = module.__dict__.pop("_zerotune_peft_forward", None)
        if original is not None:
            module.__dict__.pop("forward", None)
