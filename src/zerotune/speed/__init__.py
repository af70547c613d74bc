"""Speed features: each changes how fast a step runs, never what it computes. The loop calls ``install()`` once,
after the model and its adapters are built and before the engine wraps it.

    compile.py            regional torch.compile of the decoder layers; graph-break check after the first step
    fused_projections.py  q/k/v and gate/up as one matmul with the LoRA matrices stacked in
    fused_check.py        the fused projections' install-time check against PEFT's path, and their removal
    swiglu.py             silu(gate) * up with its backward as one kernel (used by fused projections)
    chunked_loss.py       cross-entropy from the last hidden states in chunks: no full fp32 logits
    nf4.py                QLoRA's 4-bit matmul in torch ops, so it compiles with its layer
    stacked_matmuls.py    the stacked matmuls (autograd Functions and custom ops) the fused projections run
    plain_causal.py       the host's "no mask needed" hint to transformers' SDPA mask builder (for step graphs)
    step_graphs.py        a whole training step captured and replayed as one CUDA graph

The features' modules are imported only when a run installs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zerotune.config import RunConfig
from zerotune.errors import ConfigError


@dataclass
class Installed:
    """What ``install()`` put on the model, and the one-line notes saying what and why not."""

    loss_head: object | None = None  # a chunked_loss.ChunkedLossHead (token_loss_sum, score_pairs); None: logits
    graphs: bool = False  # whether steps replay as CUDA graphs (False where the attention rules them out)
    compiled: bool = False  # whether the decoder layers were compiled
    fused_groups: int = 0  # groups of projections fused (q/k/v, gate/up, o, down)
    nf4_matmuls: int = 0  # 4-bit matmuls compiled with their layers
    compiled_layers: int = 0
    notes: list[str] = field(default_factory=list)  # for the run's log, in installation order
    graph_breaks_before: dict[str, int] = field(default_factory=dict)  # torch.compile's counters at install

    def new_graph_breaks(self) -> str | None:
        """After the first step has traced the compiled layers: one line if they broke their graphs, else None."""
        if not self.compiled:
            return None
        from zerotune.speed.compile import new_graph_breaks

        return new_graph_breaks(self.graph_breaks_before)


def install(model: torch.nn.Module, config: RunConfig, settings, *, precision) -> Installed:
    """Install the speed features ``settings`` (zerotune.resolve.Settings) turned on, on ``model`` (adapters
    applied, not yet wrapped by the engine), in this order. A feature whose install-time check fails is left out
    with a note saying why (or, asked for with ``on`` where leaving it out changes what the user asked, a
    ConfigError). ``precision``: the context a forward runs in (for the fused projections' logits probe)."""
    compiled, fuse = settings.compile, settings.fused_projections
    installed = Installed(graphs=settings.cuda_graph, compiled=compiled)
    # 1. transformers 5.25+'s hub-kernel dispatch wrapper off the attention forwards, before the fused
    #    projections wrap them and before torch.compile traces them (its global write breaks the graph)
    if fuse or compiled:
        from zerotune.speed.compile import without_hub_kernel_dispatch

        without_hub_kernel_dispatch(model)
    # 2. the chunked loss on the output head: outside the decoder layers, so the order there does not matter
    if settings.chunked_loss:
        from zerotune.speed.chunked_loss import install_chunked_loss

        installed.loss_head, why_not = install_chunked_loss(model, compiled=compiled)
        if why_not:
            installed.notes.append(f"model.chunked_loss: kept the stock loss because {why_not}")
    # 3. fused projections (and the SwiGLU kernel), kept only if a logits probe equals PEFT's path; before
    #    compiling, so the compiled layers trace the fused forwards
    if fuse:
        from zerotune.speed.fused_check import install_checked

        installed.fused_groups, why_not = install_checked(model, precision, swiglu=config.adapter.swiglu_kernel)
        installed.notes.append(
            f"adapter.fused_projections: {installed.fused_groups} groups of projections fused (q/k/v, gate/up, o, "
            "down)" if not why_not else f"adapter.fused_projections: off, PEFT's path kept: {why_not}")
    # 4. for step graphs, the host's plain-causal hint to the SDPA mask builder (the attention implementation
    #    the compiled layers then trace)
    if installed.graphs:
        installed.graphs = _plain_causal_hint(model, config, installed.notes, precision)
    if compiled:
        # 5. QLoRA's 4-bit matmul as torch ops, in place before the layers compile around it
        if settings.compiled_nf4:
            from zerotune.speed.nf4 import install_compiled_nf4

            installed.nf4_matmuls = install_compiled_nf4(model)
            installed.notes.append(
                f"QLoRA: {installed.nf4_matmuls} 4-bit matmuls compiled with their layers (zerotune.speed.nf4)"
                if installed.nf4_matmuls else "QLoRA: bitsandbytes' matmul (the installed bitsandbytes packs NF4 "
                "in a layout zerotune.speed.nf4 was not built for)")
        # 6. compile the decoder layers last: they trace everything installed above
        from zerotune.speed.compile import compile_layers

        installed.compiled_layers = compile_layers(model)
        installed.notes.append(f"compiling {installed.compiled_layers} decoder layers (torch.compile; the first "
                               "steps are slow)")
    # 7. torch.compile's graph-break counters now, so the loop can report breaks once the first step has run
    from zerotune.speed.compile import graph_breaks

    installed.graph_breaks_before = graph_breaks()
    return installed


def _plain_causal_hint(model: torch.nn.Module, config: RunConfig, notes: list[str], precision) -> bool:
    """Install the plain-causal hint; whether step graphs stay on (auto turns them off, with a note, where the
    model did not load with SDPA attention or the hinted path does not compute what the masked one does; on
    stops with a ConfigError)."""
    from zerotune.speed.plain_causal import install_plain_causal_hint

    loaded = getattr(model.config, "_attn_implementation", "another")
    if not install_plain_causal_hint(model):
        why = f"the model loaded with {loaded} attention, not SDPA"
    else:
        why = _plain_causal_problem(model, precision)
        if why is None:
            return True
        _remove_plain_causal_hint(model, loaded)
    if config.train.cuda_graph == "on":
        raise ConfigError(f"train.cuda_graph: {config.model.name}: {why}; drop --cuda-graph")
    notes.append(f"train.cuda_graph auto: off, {why}")
    return False


def _plain_causal_problem(model: torch.nn.Module, precision) -> str | None:
    """Whether the hinted path (no mask at all for a plain causal batch) gives the logits of the masked path on
    a probe sequence: batched with a padded row, so transformers really builds a mask for it. Some attention code
    cannot take a missing mask (Falcon's new decoder layout in transformers 5.17 added None to its scores);
    that must turn the hint off here, not fail the first step."""
    from zerotune.speed.plain_causal import plain_causal

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    ids = torch.randint(embeddings.num_embeddings, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # the second row is padded: the first one's logits then come through a real mask
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision():
            masked = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
            with plain_causal(True):
                hinted = model(input_ids=ids[:1], use_cache=False).logits[0].float()
    except Exception as error:  # noqa: BLE001 - any attention code that cannot run without a mask
        return f"its attention failed without a mask ({type(error).__name__}: {' '.join(str(error).split())[:160]})"
    finally:
        model.train(training)
    error = float((hinted - masked).norm() / masked.norm().clamp(min=1e-30))
    if not error <= (1e-5 if _all_fp32(model) else 0.25):  # 16-bit: SDPA kernels differ (3.9e-2 on a 7B)
        return f"its logits without a mask differ from the masked ones by {error:.1e} (relative)"
    return None


def _all_fp32(model: torch.nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def _remove_plain_causal_hint(model: torch.nn.Module, loaded: str) -> None:
    """Back to the attention the model loaded with (the hint's registrations stay; nothing uses them)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) is not None:
            config._attn_implementation = loaded
