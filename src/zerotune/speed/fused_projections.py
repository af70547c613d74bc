"""Sibling projections that read the same input (q/k/v, gate/up) as one matmul each way, with the LoRA
matrices stacked into the frozen weight, in compiled layers.

A Llama-style layer projects one input three times (q_proj, k_proj, v_proj) and another twice (gate_proj,
up_proj). Under LoRA each projection is a large frozen matmul plus two small ones, and each small one reads or
writes a full [tokens, hidden] tensor: on a 7B LoRA step the small matmuls took ~10% of the GPU time. Narrow
outputs also fill the GPU badly: with grouped-query attention k_proj and v_proj have a quarter of q_proj's
columns.

Fused, a group (q/k/v, gate/up, and o_proj and down_proj as groups of one) holds one stacked weight, the
frozen weights plus copies of the adapter's matrices: [frozen weights | block-diagonal LoRA-B] where the output
is wider than the input (q/k/v, gate/up), else [frozen weights; LoRA-A] (o_proj, down_proj).
zerotune.speed.stacked_matmuls runs each group's matmuls against it and says what they save against PEFT's. The
copies are refreshed from the parameters before every use: by the model's forward pre-hook (outside compiled
layers, where the copy is an ordinary in-place kernel) and by eager calls. Stacking needs x and the adapters
to meet in the frozen weights' dtype (autocast to it, or all in it, as in fp32); otherwise, and with LoRA
dropout, the group runs the frozen matmul against the concatenated weights and the adapters separately. With
dropout each sibling's adapter runs on its own mask as in PEFT, drawn in the order PEFT's separate calls draw
them (so an eager run gives PEFT's values, masks included).

How, without touching the model's code: the first sibling called computes the whole group's output, splits it
into the siblings' columns (q/k/v's as separate tensors, so that the part attention keeps, v, does not keep its
siblings alive; gate/up's as views of one tensor, since a gated MLP keeps both anyway) and keeps the parts,
with the input they came from; each later sibling called with that same input returns its part; the last one
clears the memo, and so does every call of the module that holds them (a forward pre-hook), so no part outlives
the call it was computed in. Under torch.compile this is ordinary Python state traced into one graph, so the
layer's graph holds each fused matmul once and its backward too.
Beyond the projections, one module's forward is replaced: a Llama-style MLP (SWIGLU_MLPS, SiLU) whose gate/up
run stacked keeps gate/up's output whole and runs silu(gate) * up through zerotune.speed.swiglu, whose backward is one
kernel writing [gate | up]'s gradient (its own forward runs whenever the stacked path does not apply).
The members' frozen weights become views of the stacked tensor (its rows, or its leading columns), held by
each member as a non-persistent buffer, so nothing is stored twice and the state dict is unchanged; the
adapters stay PEFT's own modules, saved as before.

Covered: PEFT LoRA Linear layers over plain ``nn.Linear`` bases (or Falcon's FalconLinear) of one dtype and
device, one active adapter, no DoRA or other variant, no LoRA bias; base biases all present or all absent. In a layer with gradient
checkpointing no group keeps a memo (a compiled checkpoint cannot hold its Python state), so a group is fused
there only where one call computes its whole output: o_proj and down_proj; gate/up where the MLP's forward is
replaced; q/k/v where the attention's forward is wrapped (QKV_ATTENTIONS: the module's own forward runs on a
shallow view of it whose q/k/v return their columns of the stacked output, _qkv_attention_forward). Anything
else keeps PEFT's forward, as does a member whose state changes later (adapters disabled or merged).

A fused model is for training: q/k/v's and gate/up's base weights are column views of the stacked tensor,
which transformers' ``save_pretrained`` cannot serialise (even after ``merge_and_unload``). zerotune saves only
the adapters from it, and ``zerotune merge`` loads the base model afresh.
"""

from __future__ import annotations

import functools
import types

import torch

from zerotune.speed.stacked_matmuls import StackedLinear, WideLinear, lora_linear, wide_linear
from zerotune.speed.swiglu import silu_mul

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",),
          # Falcon: q/k/v already one matrix (query_key_value), no gate; each a group of one, stacked with its adapter
          ("query_key_value",), ("dense_h_to_4h",), ("dense",), ("dense_4h_to_h",))
# base layers computing x @ W^T + b exactly as nn.Linear does (Falcon's subclass only spells the matmul out; a
# transformers without it leaves Falcon's layers to PEFT's path, which the install-time check then reports)
try:
    from transformers.models.falcon.modeling_falcon import FalconLinear
except ImportError:
    LINEAR_BASES = {torch.nn.Linear}
else:
    LINEAR_BASES = {torch.nn.Linear, FalconLinear}
# groups whose parts are returned as views of one output: a gated MLP, act(gate) * up, keeps both for its backward
VIEWS = {("gate_proj", "up_proj")}
B_IN_COLUMNS = True  # groups wider than their input hold LoRA-B in columns (else LoRA-A in rows, as the others)
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)): with SiLU and gate/up stacked,
# zerotune.speed.swiglu runs the activation, its backward one kernel writing gate/up's gradient whole
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
# attention classes whose forward reads its input only through q_proj, k_proj and v_proj (and its shape): in a
# checkpointed layer their forward is wrapped so that q/k/v run as one stacked matmul (_qkv_attention_forward)
QKV_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
# the stacked dimension (frozen rows + rank, or input features + rank) padded with zeros to a multiple of this:
# cuBLAS ran the odd sizes slower (down_proj's 4,112 rows: -6 to -25% on an H200; benchmarks/gemm_shapes.py)
PAD_TO = 64


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

    if not all(type(m) is LoraLinear and type(m.base_layer) in LINEAR_BASES for m in members):
        return False
    names = {_adapter(m) for m in members}
    weights = [m.base_layer.weight for m in members]
    biases = [m.base_layer.bias is not None for m in members]
    return (len(names) == 1 and None not in names and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
            and len(set(biases)) == 1 and not any(w.requires_grad for w in weights))


class _Group:
    """The siblings in GROUPS order (the order Llama-style layers call them: the last one clears the memo; a
    model calling them in another order stays correct, computing the group more than once), the memo:
    (input, parts) from the call that computed them, and the stacked weight, which holds copies of the
    adapter's matrices next to the frozen weights (refreshed from them before each use). Where the group's
    output is wider than its input (q/k/v, gate/up), the LoRA-B matrices sit block-diagonally in
    columns after the frozen weights' (``columns``); otherwise the LoRA-A matrices sit in rows under them.
    ``padding`` zero columns (or rows) follow them (PAD_TO).
    ``copies``: the group's output is returned as separate tensors, one per sibling (else as views, VIEWS).
    ``keeps_memo``: off in checkpointed layers, where a group of one computes its output in its own call and a
    larger group (gate/up, called by the MLP's own forward when the stacked path does not apply) runs PEFT's."""

    def __init__(self, members: tuple, adapter: str, names: tuple, memo: bool = True):
        self.members = members
        self.memo = None
        self.keeps_memo = memo  # False in a checkpointed layer: each call computes its own output, no state kept
        self.adapter = adapter
        self.frozen_rows = sum(m.base_layer.out_features for m in members)
        self.in_features = members[0].base_layer.in_features
        self.columns = B_IN_COLUMNS and self.frozen_rows > self.in_features
        rows = [m.base_layer.out_features for m in members]
        ranks = [m.lora_A[adapter].weight.shape[0] for m in members]
        # each member's block of the block-diagonal B: (first row, end row, first column, end column)
        self.blocks = [(sum(rows[:i]), sum(rows[:i + 1]), sum(ranks[:i]), sum(ranks[:i + 1]))
                       for i in range(len(members))]
        self.rank = sum(ranks)
        self.padding = -((self.in_features if self.columns else self.frozen_rows) + self.rank) % PAD_TO
        self.copies = names not in VIEWS  # the parts returned as separate tensors (else as views of one)

    @property
    def stacked(self) -> torch.Tensor:
        """A buffer of the first member, so that ``model.to(...)`` moves it with the rest."""
        return self.members[0]._zerotune_stacked


def _stacked_adapters(group: _Group) -> tuple[list, list] | None:
    """The A and B matrices of the group's adapter, if every member has them and their ranks fill the
    stacked weight's adapter rows (or columns)."""
    name = group.adapter
    if not all(name in m.lora_A and name in m.lora_B for m in group.members):
        return None
    weights_a = [m.lora_A[name].weight for m in group.members]
    weights_b = [m.lora_B[name].weight for m in group.members]
    shapes = [(row_end - row, col_end - col) for row, row_end, col, col_end in group.blocks]
    extra = group.rank + group.padding
    stacked = ((group.frozen_rows, group.in_features + extra) if group.columns
               else (group.frozen_rows + extra, group.in_features))
    fits = [tuple(w.shape) for w in weights_b] == shapes and tuple(group.stacked.shape) == stacked
    return (weights_a, weights_b) if fits else None


def _stacking_applies(group: _Group, name: str, x: torch.Tensor) -> bool:
    """The stacked matmul gives PEFT's values where x and the adapters meet in the frozen weights' dtype:
    autocast to it, or x and the adapters already in it (PEFT casts x to A's dtype otherwise)."""
    dtype = group.stacked.dtype
    if name != group.adapter or not all(isinstance(m.lora_dropout[name], torch.nn.Identity) for m in group.members):
        return False
    weights = _stacked_adapters(group)
    if weights is None:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type) == dtype
    return x.dtype == dtype and all(w.dtype == dtype for w in weights[0] + weights[1])


def _group_adapter(group: _Group) -> str | None:
    """The one adapter every member of the group runs now, if they agree (else the group runs PEFT's path)."""
    names = {_adapter(m) for m in group.members}
    return names.pop() if len(names) == 1 else None


def _fused_forward(self, x, *args, **kwargs):
    group = self._zerotune_group
    name = _group_adapter(group)
    if args or kwargs or name is None:
        group.memo = None
        return self._zerotune_peft_forward(x, *args, **kwargs)
    if not group.keeps_memo:  # a checkpointed layer: no Python state may outlive the call
        if len(group.members) > 1:
            return self._zerotune_peft_forward(x)
        return _group_parts(self, group, name, x)[0]
    index = self._zerotune_index
    memo = group.memo
    if memo is None or memo[0] is not x:
        memo = group.memo = (x, _group_parts(self, group, name, x))
    if index == len(group.members) - 1:
        group.memo = None
    return memo[1][index]


def _group_parts(self, group: _Group, name: str, x: torch.Tensor) -> tuple:
    """Every member's output for input x, in member order."""
    members, sizes = group.members, [m.base_layer.out_features for m in group.members]
    if _stacking_applies(group, name, x):
        if group.columns:
            return _separate(_wide_output(self, group, name, x), sizes, group.copies)
        if not torch.compiler.is_compiling():  # compiled, the model's pre-hook has refreshed them (_refresh)
            _refresh([group])
        if not group.keeps_memo:  # a checkpointed layer (one member): x A^T its own matmul, as it recomputes
            member = members[0]
            weight_a, weight_b = member.lora_A[name].weight, member.lora_B[name].weight
            with torch.no_grad():  # the op returns A's gradient
                xa = torch.nn.functional.linear(x.to(group.stacked.dtype), weight_a.to(group.stacked.dtype))
            result = lora_linear(x, xa, group.stacked, group.frozen_rows, float(member.scaling[name]), weight_a,
                                 weight_b)
            return (result if self._zerotune_fused_bias is None else result + self._zerotune_fused_bias,)
        out = StackedLinear.apply(x, group.stacked, group.frozen_rows, *[m.lora_A[name].weight for m in members])
        # x A^T copied out ([tokens, rank] columns): the LoRA-B matmul's backward keeps it, and as a view it
        # would keep the whole output alive (4.6 GiB on an H200 W2 step)
        end = group.frozen_rows + group.rank
        result, xa = out[..., :group.frozen_rows], out[..., group.frozen_rows:end].contiguous()
        if self._zerotune_fused_bias is not None:
            result = result + self._zerotune_fused_bias
    else:
        result = torch.nn.functional.linear(x, self._zerotune_fused_weight, self._zerotune_fused_bias)
        lora_x = self._cast_input_dtype(x, members[0].lora_A[name].weight.dtype)
        if not all(isinstance(m.lora_dropout[name], torch.nn.Identity) for m in members):
            # PEFT's update per member, each through its own dropout, drawn in the members' call order
            return tuple((base + m.lora_B[name](m.lora_A[name](m.lora_dropout[name](lora_x))) * m.scaling[name])
                         .to(result.dtype) for m, base in zip(members, result.split(sizes, -1)))
        xa = torch.nn.functional.linear(lora_x, torch.cat([m.lora_A[name].weight for m in members]))
    weight_b = torch.block_diag(*[m.lora_B[name].weight * m.scaling[name] for m in members])
    return _separate((result + torch.nn.functional.linear(xa, weight_b)).to(result.dtype), sizes, group.copies)


def _wide_output(self, group: _Group, name: str, x: torch.Tensor) -> torch.Tensor:
    """A column group's whole output for x ([q | k | v] or [gate | up]), through the stacked weight."""
    if not torch.compiler.is_compiling():  # compiled, the model's pre-hook has refreshed them (_refresh)
        _refresh([group])
    members = group.members
    scalings = [float(m.scaling[name]) for m in members]
    weights_a, weights_b = [m.lora_A[name].weight for m in members], [m.lora_B[name].weight for m in members]
    if group.keeps_memo:
        out = WideLinear.apply(x, group.stacked, group.blocks, scalings, *weights_a, *weights_b)
    else:
        out = wide_linear(x, group.stacked, [n for block in group.blocks for n in block], scalings, weights_a,
                          weights_b)[0]
    return out if self._zerotune_fused_bias is None else out + self._zerotune_fused_bias


def _swiglu_mlp_forward(self, x):
    """down(silu(gate(x)) * up(x)) with gate/up's output kept whole and SwiGLU's backward as one kernel
    (zerotune.speed.swiglu), where gate/up run stacked; otherwise the module's own forward."""
    gate_proj = self.gate_proj
    group = gate_proj._zerotune_group
    name = _group_adapter(group)
    if name is None or not group.columns or not _stacking_applies(group, name, x):
        return self._zerotune_mlp_forward(x)
    gate_up = _wide_output(gate_proj, group, name, x)
    if not group.keeps_memo:  # checkpointed: SwiGLU in torch ops, which the compiler recomputes and fuses
        gate, up = gate_up.chunk(2, -1)  # (zerotune.speed.swiglu's autograd.Function would be kept on torch 2.11)
        return self.down_proj(torch.nn.functional.silu(gate) * up)
    return self.down_proj(silu_mul(gate_up))


class _Columns(torch.nn.Module):
    """Stands in for one of q/k/v in _qkv_attention_forward's view: its columns of the group's output."""

    def __init__(self, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv[..., self.start:self.end]


@functools.cache
def _view_class(cls: type) -> type:
    """``cls`` whose ``training`` is the viewed module's, so a view follows model.train() and model.eval()."""
    return type(f"{cls.__name__}QKVView", (cls,), {"training": property(lambda self: self._zerotune_viewed.training)})


def _qkv_view(attention: torch.nn.Module, group: _Group) -> torch.nn.Module:
    """A shallow copy of the attention module (its attributes, parameters and o_proj shared) whose q_proj, k_proj
    and v_proj return their columns of q/k/v's stacked output. Not a submodule: nothing is stored twice."""
    import copy

    view = copy.copy(attention)
    view.__class__ = _view_class(type(attention))
    object.__setattr__(view, "_zerotune_viewed", attention)
    view._modules = dict(attention._modules)
    for name, (row, row_end, _, _) in zip(("q_proj", "k_proj", "v_proj"), group.blocks):
        view._modules[name] = _Columns(row, row_end)
    return view


def _qkv_attention_forward(self, *args, **kwargs):
    """The attention module's own forward, run on a view of it (_qkv_view) and given q/k/v's whole stacked output
    for its input: its q_proj, k_proj and v_proj calls then take their columns. This computes q/k/v in one call
    with no state kept, as a checkpointed layer needs. Where the stacked path does not apply, the module's own
    forward runs with PEFT's projections."""
    q_proj = self.q_proj
    group = q_proj._zerotune_group
    name = _group_adapter(group)
    keyword = "hidden_states" in kwargs
    hidden_states = kwargs["hidden_states"] if keyword else args[0]
    if name is None or not _stacking_applies(group, name, hidden_states):
        return self._zerotune_attention_forward(*args, **kwargs)
    qkv = _wide_output(q_proj, group, name, hidden_states)
    forward, view = self._zerotune_attention_forward.__func__, self._zerotune_qkv_view
    if keyword:
        return forward(view, *args, **{**kwargs, "hidden_states": qkv})
    return forward(view, qkv, *args[1:], **kwargs)


def _separate(output: torch.Tensor, sizes: list[int], copies: bool) -> tuple:
    """The siblings' columns. With ``copies``, each its own tensor: as views of one tensor, a part the backward
    keeps (v_proj's output, which attention saves) would keep its siblings' columns alive too (q and k:
    0.7-1 GiB on a 7B step). Compiled, the sum is written straight into the separate parts. Without (gate/up,
    whose parts a gated MLP's backward keeps both), views: the copies would only cost a full-size write."""
    if len(sizes) == 1:
        return (output,)
    parts = output.split(sizes, -1)
    return tuple(part.contiguous() for part in parts) if copies else parts


def install_fused_projections(model: torch.nn.Module, swiglu: bool = True) -> int:
    """Fuse every covered group of ``model`` (see the module's text). Returns how many groups. ``swiglu``: MLPs
    of SWIGLU_MLPS with a SiLU run gate/up's output whole through zerotune.speed.swiglu (else their own forward)."""
    from zerotune.model import decoder_layers
    from zerotune.speed.compile import without_hub_kernel_dispatch

    without_hub_kernel_dispatch(model)  # before the attention forwards are wrapped below
    groups, hooks = [], []
    for layer in decoder_layers(model):
        checkpointed = getattr(layer, "gradient_checkpointing", False)
        for parent in list(layer.modules()):
            for names in GROUPS:
                members = tuple(getattr(parent, name, None) for name in names)
                if None in members or any(hasattr(m, "_zerotune_group") for m in members) or not _fusable(members):
                    continue
                replaced_mlp = (swiglu and names == ("gate_proj", "up_proj") and type(parent).__name__ in SWIGLU_MLPS
                                and type(parent.act_fn).__name__ in ("SiLU", "SiLUActivation"))
                forward = parent.forward
                replaced_attention = (checkpointed and names == ("q_proj", "k_proj", "v_proj")
                                      and type(parent).__name__ in QKV_ATTENTIONS
                                      and isinstance(forward, types.MethodType) and forward.__self__ is parent)
                if checkpointed and len(names) > 1 and not (replaced_mlp or replaced_attention):
                    continue  # its siblings would hand parts over through the memo
                group = _fuse(members, _adapter(members[0]), names, memo=not checkpointed)
                if not checkpointed:
                    hooks.append(parent.register_forward_pre_hook(functools.partial(_forget, group)))
                groups.append(group)
                if replaced_mlp:
                    parent._zerotune_mlp_forward = parent.forward
                    parent.forward = types.MethodType(_swiglu_mlp_forward, parent)
                if replaced_attention and group.columns:
                    object.__setattr__(parent, "_zerotune_qkv_view", _qkv_view(parent, group))
                    parent._zerotune_attention_forward = forward
                    parent.forward = types.MethodType(_qkv_attention_forward, parent)
    if groups:
        hooks.append(model.register_forward_pre_hook(lambda module, args: _refresh(groups)))
    model._zerotune_fused_hooks = hooks
    return len(groups)


def _forget(group: _Group, module, args) -> None:
    group.memo = None


@torch.no_grad()
def _refresh(groups) -> None:
    """Copy each group's LoRA-A matrices into its stacked rows, so they follow the parameters (optimizer steps,
    loaded checkpoints, any edit). The model's forward pre-hook does it for every group before the layers
    run, outside compiled layers, where it is an ordinary in-place copy (inside one, the compiler would have to
    trace a mutation of a graph input). Eager calls also refresh their own group (a projection called
    directly)."""
    for group in groups:
        weights = _stacked_adapters(group)
        if weights is None:
            continue
        # one copy kernel per matrix (inside the captured step: each extra kernel costs ~2 us)
        for (row, row_end, col, col_end), weight_a, weight_b in zip(group.blocks, *weights):
            if group.columns:
                group.stacked[row:row_end, group.in_features + col:group.in_features + col_end].copy_(weight_b)
            else:
                group.stacked[group.frozen_rows + col:group.frozen_rows + col_end].copy_(weight_a)


def _fuse(members: tuple, adapter: str, names: tuple, memo: bool = True) -> _Group:
    group, start = _Group(members, adapter, names, memo), 0
    dtype = members[0].base_layer.weight.dtype
    with torch.no_grad():
        frozen = [m.base_layer.weight for m in members]
        if group.columns:
            weight_b = torch.block_diag(*[m.lora_B[adapter].weight for m in members])
            zeros = frozen[0].new_zeros(group.frozen_rows, group.padding)
            stacked = torch.cat([torch.cat(frozen), weight_b.to(dtype), zeros], dim=1)
        else:
            zeros = frozen[0].new_zeros(group.padding, group.in_features)
            stacked = torch.cat(frozen + [m.lora_A[adapter].weight.to(dtype) for m in members] + [zeros])
        has_bias = members[0].base_layer.bias is not None
        bias = torch.cat([m.base_layer.bias for m in members]) if has_bias else None
    members[0].register_buffer("_zerotune_stacked", stacked, persistent=False)
    weight = stacked[:, :group.in_features] if group.columns else stacked[:group.frozen_rows]
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
