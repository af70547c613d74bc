"""Regional compilation: torch.compile each decoder layer, with its gradient checkpoint moved inside the
compiled call, and the checks around it (transformers' hub-kernel dispatch bypassed first, graph breaks
reported after the first step)."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch

from zerotune.model import decoder_layers


def _is_hub_kernel_dispatch(forward) -> bool:
    """Whether ``forward`` is the `kernels` package's per-call dispatch wrapper (``use_kernelized_func``)."""
    code = getattr(forward, "__code__", None)
    return (code is not None and code.co_name == "new_forward" and "kernels" in Path(code.co_filename).parts
            and callable(getattr(forward, "__wrapped__", None)))


def without_hub_kernel_dispatch(model: torch.nn.Module) -> int:
    """Bind each module's own forward where transformers routes it through the `kernels` package's dispatch.

    From transformers 5.25 (which requires `kernels`), attention modules of Llama, Qwen2, Mistral and others run
    their forward through a wrapper that writes a global (the functions that hub kernels may replace) before
    the forward and restores it after. Inside a compiled, checkpointed layer torch.compile cannot replay that
    write in the recompute, so it breaks the graph and the whole layer quietly ran uncompiled. zerotune never
    swaps in hub kernels (``kernelize``), so the wrapper always ends in the module's own forward: bind that
    directly. A module whose kernels were swapped in keeps its wrapper. Returns how many modules changed."""
    changed = 0
    for module in model.modules():
        forward = type(module).forward
        if not _is_hub_kernel_dispatch(forward) or "forward" in module.__dict__:
            continue
        kernels = module.__dict__.get("_kernel_funcs", {})
        if any("forward" in vars(kernel) for kernel in kernels.values()):  # kernelize() replaced one: keep it
            continue
        module.forward = types.MethodType(forward.__wrapped__, module)
        changed += 1
    return changed


# Inductor options for the compiled layers: pointwise kernels tiled over rows and columns. Indexed in one
# dimension, SwiGLU's backward kernel (gate and up as column views of one output) ran instruction-bound on an
# H200 (ncu: 90% of the SMs' throughput, 49% of DRAM's); in the power-bound W2 step the tiled kernels gave +2.7%
# (benchmarks/results/2026-11-29-h200-w2-variants-nd-tiling.json). Not with a ``mode`` (torch.compile takes one
# or the other).
LAYER_COMPILE_OPTIONS = {"triton.prefer_nd_tiling": True}


def compile_layers(model: torch.nn.Module, mode: str | None = None) -> int:
    """Regional compilation: torch.compile each decoder layer (one graph reused by every layer, so compile
    time stays that of one layer), with LAYER_COMPILE_OPTIONS unless a ``mode`` is given. A checkpointed layer
    is checkpointed inside its compiled call (checkpoint_in_forward). Returns how many layers were compiled."""
    layers = decoder_layers(model)
    without_hub_kernel_dispatch(model)
    for layer in layers:
        checkpoint_in_forward(layer)
        compile_layer(layer, mode)
    return len(layers)


def graph_breaks() -> dict[str, int]:
    """torch.compile's graph breaks so far in this process, by reason (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def new_graph_breaks(before: dict[str, int]) -> str | None:
    """One line saying that compiled layers broke their graphs since ``before`` (graph_breaks()), or None.

    A graph break leaves the code around it uncompiled: the run stays correct but loses the compiled path's
    speed. An upstream change does this quietly (transformers 5.25's hub-kernel dispatch did, inside every
    checkpointed layer), so the loop checks once, after the first step has traced the layers."""
    now = graph_breaks()
    new = {reason: count - before.get(reason, 0) for reason, count in now.items() if count > before.get(reason, 0)}
    if not new:
        return None
    first = " ".join(next(iter(new)).split())[:200]
    return (f"model.compile: {sum(new.values())} graph break(s) in the compiled layers, so parts of them run "
            f"uncompiled (correct, but slower); first: {first}. Usually an upstream change in transformers or "
            f"PEFT; --compile off silences this")


def compile_layer(layer: torch.nn.Module, mode: str | None = None) -> None:
    """torch.compile one layer: with ``mode`` if given, else with LAYER_COMPILE_OPTIONS."""
    if mode:
        layer.compile(mode=mode)
    else:
        layer.compile(options=dict(LAYER_COMPILE_OPTIONS))


def checkpoint_in_forward(layer: torch.nn.Module) -> bool:
    """Move a layer's gradient checkpointing from around its ``__call__`` into its ``forward``.

    transformers 5.17 (the GPU box's) checkpoints a layer around ``__call__``; 5.24 around ``forward``. A layer
    compiled through ``Module.compile`` compiles ``__call__``'s inner call, so only the later layout puts the
    checkpoint inside the compiled region, where the compiler recomputes just what the backward reads: not
    the last projection's output (down_proj, a ninth of the layer's matmul work), and the recomputed kernels
    fuse with the backward's. Under the earlier layout the whole compiled forward runs again. Here a layer of
    the earlier layout gets the later one (its flag off, so ``__call__`` passes through, and a ``forward`` that
    checkpoints when training with gradients, as transformers does). Returns whether it changed the layer.

    Not for a layer holding 4-bit weights: torch 2.11's compiler keeps the activations around an autograd
    Function (bitsandbytes' 4-bit matmul, or zerotune.speed.nf4's) inside a compiled checkpoint, so the layer saved
    what checkpointing drops (a 7B QLoRA at micro-batch 1: 10.3 GiB peak, not 5.2; torch 2.13 recomputes them).
    Nor for a layer that draws random numbers (LoRA or attention dropout). Its gradients there are right (the
    compiled checkpoint replays the forward's draws from saved generator states: central differences agree, on
    CPU and on CUDA, and step graphs give the op-by-op run's losses), but on the GPU box (torch 2.11) it did not
    pay: with dynamic shapes (unpacked batches of varying length) the compiler's partitioner failed ("Node ...
    was invalid, but is output"), and W1-ckpt with --lora-dropout 0.05 ran at 1.83x the HF path for 1.03x its
    peak memory (2026-11-29-h200-w1-ckpt-dropout-moved-at-097557c.json).
    """
    if type(layer).__call__ is torch.nn.Module.__call__ or not getattr(layer, "gradient_checkpointing", False):
        return False
    if any(type(getattr(module, "weight", None)).__name__ == "Params4bit" for module in layer.modules()):
        return False
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in layer.modules()) or \
            getattr(getattr(layer, "self_attn", None), "attention_dropout", 0.0):
        return False
    move_checkpoint_into_forward(layer)
    return True


def move_checkpoint_into_forward(layer: torch.nn.Module) -> None:
    """The move itself, without checkpoint_in_forward's exclusions: the flag off, a checkpointing forward."""
    layer.gradient_checkpointing = False
    layer.forward = types.MethodType(_checkpointed_forward, layer)


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
    return forward(self, *args, **kwargs)
