"""Which fast-path pieces pay on W1 (or W2 with --arch llama-3-8b), one GPU: zerotune's step with pieces switched on and off, each timed
and profiled in one process (no HF baseline here: this picks defaults; `zerotune bench` reports ratios).

Per variant: tokens/s over timed steps after warm-up, peak GiB, and a torch.profiler pass that splits the
step's wall time into GEMM, attention, other kernels and idle gaps (wall minus kernel time).

Usage: python benchmarks/w1_variants.py --out DIR [--variants a,b,...] [--steps N] [--arch llama-3-8b]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

BASE = dict(micro=1, ckpt=False, compile=True, mode=None, liger=False, host_count=True,
            loss_chunk=None, cpp_wrapper=False, graphed=False, mask=True,
            packed_probe=True, outer_ckpt=False, fused=False, compiled_loss=False, inductor={}, dropout=0.0,
            unstacked=False, sdpa=None, rows_only=False, copied_parts=False, unpadded=False, layer_options=None,
            inductor_swiglu=False, qkv_unwrapped=False)
VARIANTS = {
    "compiled": {},
    "compiled-nonzero-sync": dict(host_count=False),
    "compiled-reduce-overhead": dict(mode="reduce-overhead"),
    "compiled-max-autotune": dict(mode="max-autotune-no-cudagraphs"),
    "compiled-loss-chunk512": dict(loss_chunk=512),
    "compiled-loss-chunk2048": dict(loss_chunk=2048),
    "compiled-reduce-overhead-loss-chunk512": dict(mode="reduce-overhead", loss_chunk=512),
    "compiled-cpp-wrapper": dict(cpp_wrapper=True),
    "eager": dict(compile=False),
    "eager+liger": dict(compile=False, liger=True),
    "compiled+liger": dict(liger=True),
    "ckpt-mb4-compiled": dict(micro=4, ckpt=True),
    "ckpt-mb4-compiled-reduce-overhead": dict(micro=4, ckpt=True, mode="reduce-overhead"),
    # The whole step as one CUDA graph (gpu_qlora_profile.whole_step_graph); run these last: the
    # transformers patches it makes stay for the rest of the process.
    "compiled-no-mask": dict(mask=False),  # the batch as the training loop sends it without padding
    "ckpt-mb4-compiled-no-mask": dict(micro=4, ckpt=True, mask=False),
    # without transformers' packed-sequence probe (a host sync in every forward); exact for one-sequence rows
    "compiled-no-mask-no-probe": dict(mask=False, packed_probe=False),
    "ckpt-mb4-compiled-no-mask-no-probe": dict(micro=4, ckpt=True, mask=False, packed_probe=False),
    "compiled-graphed": dict(graphed=True, mask=False),
    "ckpt-mb4-compiled-graphed": dict(micro=4, ckpt=True, graphed=True, mask=False),
    # transformers < 5.2x checkpoints around the compiled call (the whole compiled forward runs again);
    # compile_layers moves it inside (speed.compile.checkpoint_in_forward): these keep the earlier layout
    "ckpt-mb4-compiled-graphed-outer-ckpt": dict(micro=4, ckpt=True, graphed=True, mask=False, outer_ckpt=True),
    "ckpt-mb4-compiled-outer-ckpt": dict(micro=4, ckpt=True, outer_ckpt=True),
    # adapter.fused_projections: q/k/v and gate/up as one matmul each way (layers without checkpointing)
    "compiled-graphed+fused": dict(graphed=True, mask=False, fused=True),
    "compiled+fused": dict(fused=True),
    # under checkpointing gate/up (through the replaced MLP forward), o and down fused as custom ops; q/k/v keep
    # PEFT's path
    "ckpt-mb4-compiled-graphed+fused+compiled-loss": dict(micro=4, ckpt=True, graphed=True, mask=False, fused=True,
                                                          compiled_loss=True),
    # as before q/k/v were fused under checkpointing (through the wrapped attention forward): q/k/v on PEFT's path
    "ckpt-mb4-compiled-graphed+fused-qkv-unwrapped+compiled-loss": dict(micro=4, ckpt=True, graphed=True, mask=False,
                                                                        fused=True, compiled_loss=True,
                                                                        qkv_unwrapped=True),
    # the chunked loss's softmax and gradient through torch.compile (loss.compiled_chunk_math), as train does
    # under --compile: no fp32 copy of each chunk's logits
    "compiled-graphed+fused+compiled-loss": dict(graphed=True, mask=False, fused=True, compiled_loss=True),
    # the chunked loss over more rows per chunk than loss.chunk_tokens_for's 512 (at a 128k vocabulary): fewer,
    # larger head GEMMs (the input-gradient one split-K at 512 rows) for more logits in memory at once
    "compiled-graphed+fused+compiled-loss-chunk1024": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                          loss_chunk=1024),
    "compiled-graphed+fused+compiled-loss-chunk2048": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                          loss_chunk=2048),
    "ckpt-mb4-compiled-graphed+fused+compiled-loss-chunk2048": dict(micro=4, ckpt=True, graphed=True, mask=False,
                                                                    fused=True, compiled_loss=True, loss_chunk=2048),
    "ckpt-mb4-compiled-graphed+compiled-loss": dict(micro=4, ckpt=True, graphed=True, mask=False,
                                                    compiled_loss=True),
    # the default LoRA dropout (0.05): fused projections fuse the frozen matmuls only
    "compiled-graphed+compiled-loss-dropout": dict(graphed=True, mask=False, compiled_loss=True, dropout=0.05),
    "compiled-graphed+fused+compiled-loss-dropout": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                         dropout=0.05),
    # fused projections as before the stacked LoRA-A rows: q/k/v and gate/up only, LoRA-A its own matmul
    "compiled-graphed+fused-unstacked+compiled-loss": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                           unstacked=True),
    # LoRA-A rows under the frozen weights in every group (as before LoRA-B went into q/k/v's and gate/up's columns)
    "compiled-graphed+fused-rows+compiled-loss": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                      rows_only=True),
    # gate/up's outputs copied out as separate tensors, as q/k/v's are (before they became views of one output)
    "compiled-graphed+fused-copied-parts+compiled-loss": dict(graphed=True, mask=False, fused=True,
                                                              compiled_loss=True, copied_parts=True),
    # the stacked weights not padded to a multiple of 64 (fused_projections.PAD_TO)
    "compiled-graphed+fused-unpadded+compiled-loss": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                          unpadded=True),
    # SwiGLU and its backward as inductor compiles them from the MLP's own forward (gate and up as views of one
    # output), as before zerotune.speed.swiglu's backward kernel
    "compiled-graphed+fused-inductor-swiglu+compiled-loss": dict(graphed=True, mask=False, fused=True,
                                                                 compiled_loss=True, inductor_swiglu=True),
    # SDPA's cuDNN attention kernels first (flash otherwise), from the compile on
    "compiled-graphed+fused+compiled-loss+cudnn-attn": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                            sdpa="cudnn"),
    "ckpt-mb4-compiled-graphed+compiled-loss+cudnn-attn": dict(micro=4, ckpt=True, graphed=True, mask=False,
                                                               compiled_loss=True, sdpa="cudnn"),
    # inductor tuning its own Triton kernels' block sizes by measuring them (longer compiles)
    "compiled-graphed+fused+compiled-loss+cdt": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                     inductor=dict(coordinate_descent_tuning=True)),
    # pointwise kernels indexed in one dimension, as before speed.compile.LAYER_COMPILE_OPTIONS tiled them over rows and
    # columns (the SwiGLU backward ran instruction-bound as a 1-D kernel)
    "compiled-graphed+fused+compiled-loss+1d-tiling": dict(graphed=True, mask=False, fused=True, compiled_loss=True,
                                                           layer_options={}),
}


INDUCTOR_DEFAULTS = {"coordinate_descent_tuning": False}


def group_of(name: str) -> str:
    low = name.lower()
    if "flash" in low or "attention" in low or "fmha" in low or "sdpa" in low:
        return "attention"
    if "gemm" in low or "nvjet" in low or "cutlass" in low or "matmul" in low or "xmma" in low:
        return "matmul"
    return "other"


def run_variant(name: str, steps: int, arch_name: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from zerotune import adapters
    from zerotune.bench import ARCHITECTURES
    from zerotune.config import AdapterConfig
    from zerotune.speed.chunked_loss import install_chunked_loss
    from zerotune.speed.compile import compile_layer, compile_layers
    from zerotune.step import token_loss_sum

    options = {**BASE, **VARIANTS[name]}
    micro, ckpt, compiled, liger = (options[k] for k in ("micro", "ckpt", "compile", "liger"))
    torch._dynamo.reset()
    torch._inductor.config.cpp_wrapper = options["cpp_wrapper"]
    for key, value in INDUCTOR_DEFAULTS.items():
        setattr(torch._inductor.config, key, options["inductor"].get(key, value))
    if not options["packed_probe"]:
        import transformers.masking_utils as hf_masking

        hf_masking.find_packed_sequence_indices = lambda position_ids: None  # inductor's generated host code in C++
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[arch_name])).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapters.apply_method(model, AdapterConfig(dropout=options["dropout"]), seed=0)
    head, _ = install_chunked_loss(model, compiled=options["compiled_loss"])
    head.chunk_tokens = options["loss_chunk"]
    if options["fused"]:
        import zerotune.speed.fused_projections as fused_projections

        if options["unstacked"]:  # put back by main() after the variant
            fused_projections.GROUPS = fused_projections.GROUPS[:2]
            fused_projections._stacking_applies = lambda *args: False
        if options["rows_only"]:
            fused_projections.B_IN_COLUMNS = False
        if options["copied_parts"]:
            fused_projections.VIEWS = set()
        if options["unpadded"]:
            fused_projections.PAD_TO = 1
        if options["qkv_unwrapped"]:
            fused_projections.QKV_ATTENTIONS = set()
        fused_projections.install_fused_projections(model, swiglu=not options["inductor_swiglu"])
    if options["layer_options"] is not None:  # put back by main() after the variant
        import zerotune.speed.compile as speed_compile

        speed_compile.LAYER_COMPILE_OPTIONS = options["layer_options"]
    if compiled and options["outer_ckpt"]:
        for layer in model.base_model.model.model.layers:
            compile_layer(layer, options["mode"])
    elif compiled:
        compile_layers(model, options["mode"])
    model.train()
    graphed = options["graphed"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True,
                                  capturable=graphed)
    ids = torch.randint(4, model.config.vocab_size, (micro, 2048), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if not options["mask"]:  # as the training loop sends a batch without padding (step_io.without_full_mask)
        batch = {"input_ids": ids, "labels": ids}

    count = micro * 2047 if options["host_count"] else None

    def plain_step():
        if options["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            loss, tokens = token_loss_sum(model, batch, head, count)
        (loss / tokens).backward()
        optimizer.step()
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step = plain_step
    if options["sdpa"] == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]

        def step():
            with sdpa_kernel(order, set_priority=True):
                return plain_step()

    if graphed:
        from gpu_qlora_profile import whole_step_graph

        warm: list = []
        step = whole_step_graph(step, 3, warm, optimizer)
        losses = [float(x) / ids.numel() for x in warm]
    else:
        losses = [float(step()) / ids.numel() for _ in range(3)]
    torch.cuda.synchronize()
    if not graphed:  # a graph's peak is its capture's (whole_step_graph reset the stats before it)
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - wall) / 2
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            ms = event.self_device_time_total / 2 / 1e3
            groups[group_of(event.key)] += ms
            kernels.append((event.key[:110], round(ms, 3)))
    kernels.sort(key=lambda kv: -kv[1])
    busy = sum(groups.values())
    del model, optimizer
    torch.cuda.empty_cache()
    return {**options, "tokens_per_second": micro * 2048 / seconds, "peak_gib": peak,
            "first_losses": losses, "step_ms": seconds * 1e3, "profiled_wall_ms": wall * 1e3,
            "kernel_ms": {k: round(v, 2) for k, v in groups.items()}, "idle_ms": round(wall * 1e3 - busy, 2),
            "top_kernels_ms": kernels[:25]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arch", default="llama-2-7b", help="an architecture of zerotune.bench.ARCHITECTURES")
    args = parser.parse_args()
    from zerotune.bench import provenance

    result = provenance("python benchmarks/w1_variants.py " + " ".join(sys.argv[1:]))
    result["variants"] = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result["architecture"] = args.arch
    out = Path(args.out) / f"variants-{args.arch}.json"
    from transformers.models.llama import modeling_llama

    # liger swaps these module-wide (classes for new models, the rope function): put them back after each
    saved = {k: getattr(modeling_llama, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    import transformers.masking_utils as hf_masking

    probe = hf_masking.find_packed_sequence_indices
    import zerotune.speed.compile as speed_compile
    import zerotune.speed.fused_projections as fused_projections

    switches = ("GROUPS", "_stacking_applies", "B_IN_COLUMNS", "VIEWS", "PAD_TO", "QKV_ATTENTIONS")
    fused_saved = {k: getattr(fused_projections, k) for k in switches}
    layer_options = speed_compile.LAYER_COMPILE_OPTIONS
    for name in args.variants.split(","):
        try:
            result["variants"][name] = run_variant(name, args.steps, args.arch)
        except Exception as error:  # one variant failing must not lose the others' numbers
            result["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        finally:
            for key, value in saved.items():
                setattr(modeling_llama, key, value)
            hf_masking.find_packed_sequence_indices = probe
            for key, value in fused_saved.items():
                setattr(fused_projections, key, value)
            speed_compile.LAYER_COMPILE_OPTIONS = layer_options
            gc.collect()
            torch.cuda.empty_cache()
        row = result["variants"][name]
        print(name, {k: row.get(k) for k in ("tokens_per_second", "peak_gib", "kernel_ms", "idle_ms", "error")},
              flush=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
