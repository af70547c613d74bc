"""Sibling projections that read the same input (q/k/v, gate/up) as one matmul each way, in compiled layers.

A Llama-style layer projects one input three times (q_proj, k_proj, v_proj) and another twice (gate_proj,
up_proj). Under LoRA each projection is a large frozen matmul plus two small ones, and each small one reads or
writes a full [tokens, hidden] tensor: on a 7B LoRA step the small matmuls took ~10% of the GPU time. Narrow
outputs also fill the GPU badly: with grouped-query attention k_proj and v_proj have a quarter of q_proj's
columns. Fused, a group is one frozen matmul against the concatenated weights, one LoRA-A matmul against the
stacked A matrices, and one LoRA-B matmul against a block-diagonal matrix of the scaled B matrices; the
backward likewise. With LoRA dropout only the frozen matmul is fused: each sibling's adapter runs on its own
dropout mask as in PEFT, the masks drawn in the order PEFT's separate calls draw them (so an eager run gives
PEFT's values, masks included).

How, without touching the model's code: the first sibling called computes the whole group's output, splits it
into the siblings' columns and keeps the parts, with the input they came from; each later sibling called with
that same input returns its part; the last one clears the memo, and so does every call of the module that
holds them (a forward pre-hook), so no part outlives the call it was computed in. Under torch.compile this is ordinary
Python state traced into one graph, so the layer's graph holds each fused matmul once and its backward too. The
siblings' frozen weights become row views of one concatenated tensor, held by each sibling as a non-persistent
buffer, so nothing is stored twice and the state dict is unchanged; the adapters stay PEFT's own modules,
saved as before.

Covered: PEFT LoRA Linear siblings over plain ``nn.Linear`` bases of one dtype and device, one active
adapter, no DoRA or other variant, no LoRA bias; base biases all present or all absent; decoder layers without gradient checkpointing (a compiled
checkpoint cannot hold the memo's Python state). Anything else keeps PEFT's forward, as does a sibling whose
state changes later (adapters disabled or merged).
"""

from __future__ import annotations

import functools
import types

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _adapter(module) -> str | None:
    """The one active adapter a sibling runs, if its state is one this path covers."""
    adapters = module.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (name is None or module.disable_adapters or module.merged or name not in module.lora_A
            or name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False)):
        return None
    return name


def _fusable(members) -> bool:
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not all(type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear for m in members):
        return False
    names = {_adapter(m) for m in members}
    weights = [m.base_layer.weight for m in members]
    biases = [m.base_layer.bias is not None for m in members]
    return (len(names) == 1 and None not in names and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
            and len(set(biases)) == 1 and not any(w.requires_grad for w in weights))


class _Group:
    """The siblings in GROUPS order (the order Llama-style layers call them: the last one clears the memo; a
    model calling them in another order stays correct, computing the group more than once) and the memo:
    (input, parts) from the call that computed them."""

    def __init__(self, members: tuple):
        self.members = members
        self.memo = None


def _fused_forward(self, x, *args, **kwargs):
    group = self._zerotune_group
    name = _adapter(self)
    if args or kwargs or name is None or any(_adapter(m) != name for m in group.members):
        group.memo = None
        return self._zerotune_peft_forward(x, *args, **kwargs)
    index = self._zerotune_index
    memo = group.memo
    if memo is None or memo[0] is not x:
        members, sizes = group.members, [m.base_layer.out_features for m in group.members]
        result = torch.nn.functional.linear(x, self._zerotune_fused_weight, self._zerotune_fused_bias)
        lora_x = self._cast_input_dtype(x, members[0].lora_A[name].weight.dtype)
        if all(isinstance(m.lora_dropout[name], torch.nn.Identity) for m in members):
            weight_a = torch.cat([m.lora_A[name].weight for m in members])
            weight_b = torch.block_diag(*[m.lora_B[name].weight * m.scaling[name] for m in members])
            update = torch.nn.functional.linear(torch.nn.functional.linear(lora_x, weight_a), weight_b)
            parts = (result + update).to(result.dtype).split(sizes, -1)
        else:  # PEFT's update per sibling, each through its own dropout, drawn in the siblings' call order
            parts = tuple((base + m.lora_B[name](m.lora_A[name](m.lora_dropout[name](lora_x))) * m.scaling[name])
                          .to(result.dtype) for m, base in zip(members, result.split(sizes, -1)))
        memo = group.memo = (x, parts)
    if index == len(group.members) - 1:
        group.memo = None
    return memo[1][index]


def install_fused_projections(model: torch.nn.Module) -> int:
    """Fuse every covered sibling group of ``model`` (see the module's text). Returns how many groups."""
    from zerotune.model import decoder_layers

    fused = 0
    for layer in decoder_layers(model):
        if getattr(layer, "gradient_checkpointing", False):
            continue
        for parent in list(layer.modules()):
            for names in GROUPS:
                members = tuple(getattr(parent, name, None) for name in names)
                if None in members or any(hasattr(m, "_zerotune_group") for m in members) or not _fusable(members):
                    continue
                group = _fuse(members)
                parent.register_forward_pre_hook(functools.partial(_forget, group))
                fused += 1
    return fused


def _forget(group: _Group, module, args) -> None:
    group.memo = None


def _fuse(members: tuple) -> _Group:
    with torch.no_grad():
        weight = torch.cat([m.base_layer.weight for m in members])
        has_bias = members[0].base_layer.bias is not None
        bias = torch.cat([m.base_layer.bias for m in members]) if has_bias else None
    group, start = _Group(members), 0
    for index, module in enumerate(members):
        stop = start + module.base_layer.out_features
        module.base_layer.weight = torch.nn.Parameter(weight[start:stop], requires_grad=False)
        if has_bias:
            module.base_layer.bias = torch.nn.Parameter(bias[start:stop], requires_grad=False)
        module.register_buffer("_zerotune_fused_weight", weight, persistent=False)
        module.register_buffer("_zerotune_fused_bias", bias, persistent=False)
        module._zerotune_group = group
        module._zerotune_index = index
        module._zerotune_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        start = stop
    return group
