"""`zerotune plan`: from a run config to a plan (memory, speed, time, cost, alternatives, lints), and its text."""

from __future__ import annotations

from dataclasses import replace

from zerotune.config import RunConfig
from zerotune.errors import ConfigError
from zerotune.plan import calibration as cal
from zerotune.plan.catalog import GPU, architecture_for
from zerotune.plan.estimate import Estimate, Scenario, alternatives, effective_fraction, estimate
from zerotune.resolve import explain_chunked_loss, explain_compile


def scenario_from_config(config: RunConfig, gpu: GPU, gpus_per_node: int, nodes: int) -> Scenario:
    arch = architecture_for(config.model.name)
    strategy, stage, offload = config.distributed.strategy, config.distributed.zero_stage, config.distributed.offload
    zero3_fetch = config.distributed.zero3_fetch
    if config.distributed.deepspeed_config and not config.distributed.no_deepspeed and strategy in ("auto", "deepspeed"):
        from zerotune.strategies.deepspeed_config import read_user_config, zero_stage

        user = read_user_config(config.distributed.deepspeed_config)
        zero = user.get("zero_optimization", {})
        if "leaf_module" in zero:  # the user's own leaf modules: treated as DeepSpeed's per-module hooks
            zero3_fetch = "module"
        strategy, stage = "deepspeed", zero_stage(user, config.distributed.zero_stage, missing=3)
        on_cpu = {part: (zero.get(f"offload_{part}") or {}).get("device") == "cpu" for part in ("param", "optimizer")}
        offload = "all" if all(on_cpu.values()) else "params" if on_cpu["param"] else \
            "optimizer" if on_cpu["optimizer"] else "none"
    if strategy in ("auto", "single") and gpus_per_node * nodes == 1:
        strategy = "single"
    elif strategy == "single":
        raise ConfigError("distributed.strategy single runs one worker; pass --gpus 1 or another --strategy")
    return Scenario(
        arch=arch, gpu=gpu, gpus_per_node=gpus_per_node, nodes=nodes, method=config.adapter.method,
        r=config.adapter.r, micro_batch=config.train.batch_size, seq_len=config.data.max_seq_len,
        grad_accum=config.train.grad_accum, checkpointing=config.model.gradient_checkpointing,
        checkpoint_every=config.model.checkpoint_every,
        packing=config.data.packing, chunked_loss=explain_chunked_loss(config, strategy)[0],
        compile=explain_compile(config.model.compile, "cuda",  # the plan is for GPUs
                                zero3=strategy == "deepspeed" and stage == 3)[0],
        mixed_precision=config.model.mixed_precision, strategy=strategy, zero_stage=stage, offload=offload,
        weight_bytes=4.0 if config.model.dtype == "fp32" else 2.0, sharded_loading=config.distributed.sharded_loading,
        zero3_fetch=zero3_fetch, objective=config.objective.name, reference=config.objective.reference)


def pick_engine(base: Scenario) -> tuple[Scenario, str]:
    """For --strategy auto on several GPUs: the faster of DDP and FSDP2 that fits at the asked micro-batch and
    checkpointing (DeepSpeed only when asked for: --strategy deepspeed or --deepspeed FILE)."""
    options = [replace(base, strategy="ddp"), replace(base, strategy="fsdp")]
    fitting = [e for e in map(estimate, options) if e.fits]
    if not fitting:
        return replace(base, strategy="fsdp"), "nothing fits; FSDP2 shards the most without offload"
    best = max(fitting, key=lambda e: e.tokens_per_second_per_gpu)
    others = ", ".join(f"{e.scenario.describe().split(',')[0]} {e.tokens_per_second_per_gpu:,.0f}"
                       for e in fitting if e is not best)
    return best.scenario, (f"{best.scenario.describe().split(',')[0]} fits ({best.gpu_needed_gib:.1f} GiB of "
                           f"{base.gpu.memory_gib:.0f}) and is fastest: {best.tokens_per_second_per_gpu:,.0f} "
                           f"tokens/s per GPU predicted" + (f" (others: {others})" if others else ""))


def auto_engine(config: RunConfig, world_size: int, device_name: str, local_gpus: int) -> tuple[str, str] | None:
    """What train's --strategy auto runs on GPUs, and why; None when the GPU or the model is not known here."""
    import math

    from zerotune.plan.catalog import gpu_from_device_name

    gpu = gpu_from_device_name(device_name)
    if gpu is None:
        return None
    try:
        per_node = max(1, min(world_size, local_gpus))
        base = replace(scenario_from_config(config, gpu, per_node, math.ceil(world_size / per_node)), strategy="auto")
    except ConfigError:
        return None
    picked, why = pick_engine(base)
    return picked.strategy, why


def lints(config: RunConfig, s: Scenario, result: Estimate) -> list[str]:
    found = []
    if config.model.dtype == "bf16" and not s.gpu.bf16:
        found.append(f"model.dtype bf16: the {s.gpu.name} has no bf16; use --dtype fp16 (auto picks fp32 there)")
    if config.model.attn_implementation == "flash_attention_2" and not s.gpu.flash_attention:
        found.append(f"flash_attention_2 needs an Ampere or newer GPU, not the {s.gpu.name}; use sdpa")
    if s.offload != "none":
        plain = estimate(replace(s, offload="none"))
        if plain.fits:
            found.append(f"CPU offload while everything fits on the GPU: {plain.tokens_per_second_per_gpu:,.0f} tokens/s "
                         f"per GPU without it against {result.tokens_per_second_per_gpu:,.0f}; drop the offload")
    if s.strategy == "deepspeed" and s.zero_stage == 3 and s.method != "full":
        fsdp = estimate(replace(s, strategy="fsdp", offload="none"))
        if fsdp.fits and fsdp.tokens_per_second_per_gpu > result.tokens_per_second_per_gpu:
            found.append(f"ZeRO-3 for LoRA: FSDP2 fits too and is faster ({fsdp.tokens_per_second_per_gpu:,.0f} against "
                         f"{result.tokens_per_second_per_gpu:,.0f} tokens/s per GPU); --strategy fsdp")
    if s.method == "qlora" and s.offload_params:
        found.append("QLoRA with DeepSpeed parameter offload: 4-bit weights are not offloadable; drop the param offload")
    if not result.fits and result.fits_training:
        fix = ("add --sharded-loading" if (s.strategy == "fsdp" or (s.strategy == "deepspeed" and s.zero_stage == 3))
               and s.method != "qlora" else
               "use --strategy fsdp --sharded-loading" if s.method != "qlora" else
               "sharded loading does not cover QLoRA yet")
        found.append(f"training would fit ({result.training_peak_gib:.1f} GiB per GPU), but this loads the whole "
                     f"base model ({result.load_peak_gib:.1f} GiB) onto each GPU before sharding it: {fix}")
    elif not result.fits:
        roomiest = estimate(replace(s, checkpointing=True, micro_batch=1, strategy="fsdp" if s.world > 1 else s.strategy))
        if not roomiest.fits:
            found.append(f"micro-batch {s.micro_batch} x {s.seq_len} tokens: even micro-batch 1 with checkpointing"
                         f"{' and FSDP2' if s.world > 1 else ''} needs {roomiest.gpu_needed_gib:.1f} GiB per GPU, more "
                         f"than the {s.gpu.name}'s {s.gpu.memory_gib:.0f}; add GPUs, use QLoRA or a shorter --max-seq-len")
        elif not s.checkpointing:
            found.append("does not fit without gradient checkpointing; add --gradient-checkpointing (see alternatives)")
    return found


def make_plan(config: RunConfig, gpu: GPU, gpus_per_node: int, nodes: int, price: float | None,
              dataset_tokens: int | None, token_note: str = "", internode_gbs: float = 12.5) -> dict:
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError("--gpus and --nodes must be at least 1")
    if price is not None and price < 0:
        raise ConfigError(f"--price-per-gpu-hour must be 0 or more, got {price}")
    scenario = replace(scenario_from_config(config, gpu, gpus_per_node, nodes), internode_gbs=internode_gbs)
    why = ""
    if scenario.strategy == "auto":
        scenario, why = pick_engine(scenario)
    result = estimate(scenario)
    real_fraction = effective_fraction(scenario)
    world = scenario.world
    plan = {"model": scenario.arch.name, "gpu": gpu.name, "gpu_memory_gib": gpu.memory_gib, "gpus_per_node": gpus_per_node, "nodes": nodes,
            "setup": scenario.describe(), "strategy_auto": why or None, "estimate": result.to_dict(),
            "real_token_fraction": real_fraction,
            "real_tokens_per_second": result.tokens_per_second_per_gpu * world * real_fraction,
            "lints": lints(config, scenario, result), "notes": list(result.notes),
            "alternatives": [{"setup": e.scenario.describe(), "tokens_per_second_per_gpu": e.tokens_per_second_per_gpu,
                              "real_tokens_per_second": e.tokens_per_second_per_gpu * world * effective_fraction(e.scenario),
                              "gpu_needed_gib": e.gpu_needed_gib} for e in alternatives(scenario)]}
    if scenario.objective != "sft":  # tokens of both sequences of a pair; DPO adds a reference forward of each
        plan["pairs_per_second"] = result.tokens_per_second_per_gpu * world / (2 * scenario.seq_len)
        plan["notes"].append(f"--objective {scenario.objective}: a micro-batch of {scenario.micro_batch} pairs is "
                             f"{scenario.sequences} sequences in one forward"
                             + ("; each is scored again by the reference, without gradient" if scenario.reference_pass
                                else "") + f"; about {plan['pairs_per_second']:,.1f} pairs/s in all")
    if token_note:
        plan["notes"].append(token_note)
    if config.train.max_steps:
        tokens = config.train.max_steps * scenario.sequences * config.train.grad_accum * world \
            * config.data.max_seq_len * real_fraction
    elif dataset_tokens:
        tokens = dataset_tokens * config.train.epochs
    else:
        tokens = None
    if tokens:
        hours = tokens / plan["real_tokens_per_second"] / 3600
        plan.update(training_tokens=tokens, hours=hours)
        if price is not None:
            plan["cost"] = hours * world * price
            plan["price_per_gpu_hour"] = price
    return plan


def render(plan: dict) -> str:
    e = plan["estimate"]
    lines = [f"zerotune plan: {plan['model']} on {plan['nodes']} node(s) x {plan['gpus_per_node']} {plan['gpu']}, "
             f"{e['scenario']['method']}, seq {e['scenario']['seq_len']}", f"setup: {plan['setup']}"]
    if plan["strategy_auto"]:
        lines.append(f"--strategy auto: {plan['strategy_auto']}")
    lines.append("memory per GPU (GiB):")
    for part, gib in e["memory_gib"].items():
        lines.append(f"  {part:<20} {gib:8.2f}")
    lines += [f"  {'peak allocated':<20} {e['peak_allocated_gib']:8.2f}"
              + ("   (at loading: the whole base model on each GPU first)" if e["load_peak_gib"] >= e["peak_allocated_gib"] else ""),
              f"  {'+ allocator slack':<20} {e['peak_allocated_gib'] * (cal.ALLOCATOR_SLACK - 1):8.2f}",
              f"  {'+ CUDA context':<20} {cal.CUDA_CONTEXT_GIB:8.2f}",
              f"  {'= needed':<20} {e['gpu_needed_gib']:8.2f} of {plan['gpu_memory_gib']:.1f} "
              f"-> {'fits' if e['fits'] else 'DOES NOT FIT'}"]
    if e["host_gib_per_node"]:
        lines.append(f"  host RAM per node for offloaded state: {e['host_gib_per_node']:.1f} GiB")
    mfu = f", LoRA-MFU {e['lora_mfu']:.0%}" if e["lora_mfu"] else ""
    lines.append(f"speed: {e['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU{mfu}; "
                 f"{plan['real_tokens_per_second']:,.0f} real tokens/s in all ({plan['real_token_fraction']:.0%} of "
                 f"slots are real tokens); {e['step_seconds']:.2f} s per optimizer step")
    if "hours" in plan:
        cost = f", ${plan['cost']:,.0f} at ${plan['price_per_gpu_hour']}/GPU-hour" if "cost" in plan else ""
        lines.append(f"time: {plan['hours']:.1f} h for {plan['training_tokens']:,.0f} real tokens{cost}")
    if plan["alternatives"]:
        lines.append("setups that fit, fastest first (real tokens/s):")
        for alt in plan["alternatives"]:
            lines.append(f"  {alt['real_tokens_per_second']:>10,.0f}  {alt['setup']}  ({alt['gpu_needed_gib']:.1f} GiB)")
    else:
        lines.append("no setup fits these GPUs")
    for lint in plan["lints"]:
        lines.append(f"lint: {lint}")
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    lines.append("accuracy: memory within 10% and speed within 25% of the measurements in benchmarks/results for "
                 "7B-8B models, and of 70B and Falcon-180B (36 layers) QLoRA, on H100/H200 (tests/test_plan.py); other "
                 "sizes and GPUs are extrapolated")
    return "\n".join(lines)


def count_dataset_tokens(config: RunConfig) -> tuple[int, str]:
    """Tokens in the training data: tokenized with the model's tokenizer when it is local, else estimated."""
    from pathlib import Path

    from zerotune.data.records import read_records

    records, _ = read_records(config.data.path, config.data.split)
    if Path(config.model.name).expanduser().is_dir():
        from zerotune.data.prepare import prepare_data
        from zerotune.model import load_tokenizer

        pairs = config.objective.name != "sft"
        data = prepare_data(replace(config.data, packing=False, eval_fraction=0.0), load_tokenizer(config.model),
                            config.train.seed, pairs=pairs)
        return sum(e.num_input_tokens if pairs else len(e.input_ids) for e in data.train), ""
    chars = sum(len(str(v)) for r in records for v in r.values())
    return chars // 4, (f"dataset tokens estimated at 4 characters per token ({len(records)} records); pass a local "
                        "model directory or --dataset-tokens for an exact count")


__all__ = ["make_plan", "render", "pick_engine", "scenario_from_config", "count_dataset_tokens", "cal"]
