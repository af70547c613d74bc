"""Memory, speed and cost of one training setup, from the architecture and the calibration constants."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from zerotune.plan import calibration as cal
from zerotune.plan.catalog import ARCHITECTURES, GPU, Architecture

REFERENCE = ARCHITECTURES["llama-2-7b"]  # the architecture the efficiency constants were fitted on

GIB = 2**30


@dataclass(frozen=True)
class Scenario:
    arch: Architecture
    gpu: GPU
    gpus_per_node: int = 1
    nodes: int = 1
    method: str = "lora"  # lora, qlora, full
    r: int = 16
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    checkpointing: bool = False
    checkpoint_every: int = 1  # with checkpointing: layers 0, N, 2N, ... recompute, the others store
    packing: bool = False
    compile: bool = False
    chunked_loss: bool = True
    mixed_precision: bool = True
    strategy: str = "single"  # single, ddp, fsdp, deepspeed
    zero_stage: int = 3
    offload: str = "none"  # none, optimizer, params, all
    zero3_fetch: str = "layer"  # ZeRO-3 gathers: a decoder layer at a time (zerotune's default) or per module
    weight_bytes: float = 2.0  # bf16/fp16; 4 for fp32
    sharded_loading: bool = False  # --sharded-loading (FSDP2, ZeRO-3): no worker ever holds the whole model
    internode_gbs: float = 12.5  # per node, for FSDP/ZeRO-3 parameter traffic between nodes
    objective: str = "sft"  # sft, or a preference objective: micro_batch then counts pairs (two sequences each)
    reference: str = "live"  # DPO: live (a reference forward in every step) or precomputed (once, before)

    @property
    def sequences(self) -> int:  # per micro-batch per GPU: a pair is a chosen and a rejected sequence
        return self.micro_batch * (1 if self.objective == "sft" else 2)

    @property
    def reference_pass(self) -> bool:  # DPO scores every sequence again without gradient, with LoRA off or a copy
        return self.objective == "dpo" and self.reference == "live"

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def tokens(self) -> int:  # per micro-batch per GPU
        return self.sequences * self.seq_len

    @property
    def recomputed_layers(self) -> int:
        return -(-self.arch.layers // self.checkpoint_every) if self.checkpointing else 0

    @property
    def recompute_fraction(self) -> float:
        return self.recomputed_layers / self.arch.layers

    @property
    def shards_weights(self) -> bool:
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def offload_params(self) -> bool:
        return self.strategy == "deepspeed" and self.offload in ("params", "all")

    @property
    def offload_optimizer(self) -> bool:
        return self.strategy == "deepspeed" and self.offload in ("optimizer", "all")

    @property
    def loads_sharded(self) -> bool:
        zero3 = self.strategy == "deepspeed" and self.zero_stage == 3
        return self.sharded_loading and (self.strategy == "fsdp" or zero3)

    def describe(self) -> str:
        engine = self.strategy
        if self.strategy == "deepspeed":
            engine = f"ZeRO-{self.zero_stage}" + (f" + offload {self.offload}" if self.offload != "none" else "")
            if self.zero_stage == 3 and self.zero3_fetch == "module":
                engine += " (per-module fetch)"
        checkpointing = "no checkpointing"
        if self.checkpointing:
            checkpointing = "checkpointing" + (f" 1 layer in {self.checkpoint_every}" if self.checkpoint_every > 1
                                               else "")
        parts = [engine, f"micro-batch {self.micro_batch}" + (f" pairs ({self.objective})" if self.sequences >
                                                                  self.micro_batch else ""), checkpointing]
        if self.packing:
            parts.append("packing")
        if self.loads_sharded:
            parts.append("sharded loading")
        return ", ".join(parts)


@dataclass
class Estimate:
    scenario: Scenario
    memory_gib: dict  # per GPU, by part (what torch's allocator reports at its peak)
    load_peak_gib: float  # every worker holds the whole base model on its GPU before sharding it
    training_peak_gib: float  # the peak once the model is sharded and training
    fits_training: bool  # would fit if loading were sharded too
    peak_allocated_gib: float
    gpu_needed_gib: float  # peak, allocator slack and CUDA context
    fits: bool
    host_gib_per_node: float
    tokens_per_second_per_gpu: float
    step_seconds: float
    lora_mfu: float | None
    notes: list

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scenario"] = {k: v for k, v in asdict(self.scenario).items() if k not in ("arch", "gpu")}
        data["scenario"]["model"] = self.scenario.arch.name
        data["scenario"]["gpu"] = self.scenario.gpu.name
        return data


def _trainable(s: Scenario) -> int:
    return s.arch.total_params if s.method == "full" else s.arch.lora_params(s.r)


def memory(s: Scenario) -> tuple[dict, float, float]:
    """Per-GPU bytes by part at the training peak, the loading peak, and host bytes per node."""
    arch, world = s.arch, s.world
    frozen_linear = arch.linear_params
    if s.method == "qlora":
        weights = frozen_linear * cal.QLORA_BYTES_PER_WEIGHT + (arch.total_params - frozen_linear) * s.weight_bytes
    else:
        weights = arch.total_params * s.weight_bytes
    layer_bytes = weights / arch.layers  # close enough: the embeddings are small against the layers
    parts, host = {}, 0.0
    load_peak = weights
    if s.shards_weights:
        live = cal.FSDP_LIVE_LAYERS if s.strategy == "fsdp" else cal.ZERO3_LIVE_LAYERS
        parts["weights"] = 0.0 if s.offload_params else weights / world
        parts["gathered layers"] = live * layer_bytes  # the engine's all-gather and prefetch buffers
        if s.offload_params:
            host += weights * s.gpus_per_node / world
    else:
        parts["weights"] = weights
    if s.method == "qlora":  # each 4-bit matrix is dequantised whole to bf16 for its matmul: the largest one's copy
        parts["dequantised matrix"] = max(a * b for a, b in arch.linears()) * 2.0
    if s.reference_pass and s.method == "full":
        parts["reference copy"] = weights  # full fine-tuning's frozen copy of the base (single, DDP)
    trainable = _trainable(s)
    if s.strategy == "deepspeed":  # bf16 params and grads, fp32 master, Adam m and v
        param, grad, optim = 2.0, 2.0, 12.0
        if s.method == "full":
            param = 0.0  # already counted as weights
        sharded = {1: (param, grad, optim / world), 2: (param, grad / world, optim / world),
                   3: (param / world, grad / world, optim / world)}[s.zero_stage]
        if s.offload_optimizer:
            host += trainable * optim * s.gpus_per_node / world
            sharded = (sharded[0], sharded[1], 0.0)
        parts["trainable state"] = trainable * sum(sharded)
    elif s.method == "full":  # bf16 weights (counted above), bf16 grads, torch AdamW moments in bf16
        parts["trainable state"] = trainable * 6.0 / (world if s.strategy == "fsdp" else 1)
    else:  # fp32 LoRA weights, grads, Adam m and v
        parts["trainable state"] = trainable * 16.0 / (world if s.strategy == "fsdp" else 1)
    load_peak += trainable * (4.0 if s.method != "full" else 0.0)
    if s.loads_sharded:
        load_peak = 0.0  # each worker allocates only its shards (FSDP2) or partitions (ZeRO-3 zero.Init)

    per_layer = s.tokens * arch.activation_elements * 2 * cal.ACTIVATION_FACTOR
    if s.method != "full" and not s.mixed_precision and s.strategy in ("single", "ddp"):
        per_layer += s.tokens * sum(a for a, _ in arch.linears()) * 4 * cal.FP32_LORA_EXTRA
    if s.chunked_loss:
        chunk = min(s.tokens, max(cal.MIN_CHUNK_TOKENS, cal.CHUNK_ELEMENTS // arch.vocab))
        logits = chunk * arch.vocab * 6 + s.tokens * arch.hidden * 4
    else:
        logits = s.tokens * arch.vocab * cal.LOGIT_BYTES_STOCK
    if s.checkpointing:
        # a recomputed layer keeps only its input; the others keep all their activations
        stored = arch.layers - s.recomputed_layers
        parts["activations"] = s.recomputed_layers * s.tokens * arch.hidden * 2 + stored * per_layer
        transient = max(logits, per_layer)
        parts["logits / loss" if logits >= per_layer else "recomputed layer"] = transient
    else:
        parts["activations"] = arch.layers * per_layer
        parts["logits / loss"] = logits
    return {k: v / GIB for k, v in parts.items()}, load_peak / GIB, host / GIB


def hardware_flops_per_token(s: Scenario, attention_len: int | None = None) -> float:
    n, arch = s.arch.matmul_weights, s.arch
    attention = arch.layers * arch.hidden * (attention_len or s.seq_len)
    flops = (6 if s.method == "full" else 4) * n + 6 * attention
    if s.reference_pass:  # one more forward of every token, without gradient
        flops += 2 * n + 2 * attention
    if s.checkpointing:
        flops += (2 * n + 2 * attention) * s.recompute_fraction
    return flops


def step_time(s: Scenario) -> tuple[float, list[str]]:
    notes = []
    path = "compiled" if s.compile else "eager"
    bf16_math = s.mixed_precision or s.strategy in ("fsdp", "deepspeed") or s.method == "full"
    factor = cal.PATH_FACTOR[(path, "bf16_lora" if bf16_math else "fp32_lora")]
    if s.strategy in ("single", "ddp"):
        factor *= cal.ENGINE_FACTOR[s.strategy]
    elif s.strategy == "fsdp":
        factor *= cal.ENGINE_FACTOR[("fsdp", path)]
    else:
        factor *= cal.ENGINE_FACTOR[("deepspeed", s.zero_stage, s.zero3_fetch if s.zero_stage == 3 else None)]
        if s.compile:
            notes.append("DeepSpeed with compiled layers was measured on one GPU only (ZeRO-1/2, 7B, micro-batch 4 "
                         "with checkpointing: 1.38-1.43x its eager layers)")
    if s.method == "full":
        factor *= cal.FULL_FACTOR[path]
    # The GPU's fixed cost per micro-batch (small kernels, gaps between launches) is per decoder layer, not per
    # weight: T_HALF tokens of a Llama-2-7B layer's work (where it was fitted), whatever this layer's width. A
    # wide layer (Falcon-180B: 14848) thus runs its matmuls closer to E_MAX than a 7B layer at the same tokens.
    reference_layer_flops = hardware_flops_per_token(replace(s, arch=REFERENCE)) / REFERENCE.layers
    fixed_flops = cal.T_HALF * s.arch.layers * reference_layer_flops
    seconds = (s.tokens * hardware_flops_per_token(s) + fixed_flops) / (s.gpu.bf16_tflops * 1e12 * cal.E_MAX * factor)
    if s.strategy == "deepspeed":
        host = cal.DEEPSPEED_HOST_SECONDS_PER_LAYER * s.arch.layers
        if host > seconds:
            notes.append(f"host-bound: DeepSpeed's per-micro-batch host work (~{host:.2f} s, measured on one H200 "
                         f"host) outlasts the GPU's {seconds:.2f} s; a larger micro-batch hides it")
            seconds = host
    passes = 2 + s.recompute_fraction
    if s.strategy == "deepspeed" and s.zero_stage == 3 and s.world > 1:
        gathered = passes * s.arch.total_params * 2.0 * (s.world - 1) / s.world  # bf16 bytes per GPU per step
        seconds += gathered / (cal.ZERO3_GATHER_LINK_SHARE[s.zero3_fetch] * s.gpu.link_gbs * 1e9)
    if s.method == "qlora":
        # the GPU dequantises every 4-bit weight once per pass; launched op by op, a QLoRA step's host work per
        # layer (more kernels and inputs than LoRA's) can outlast the GPU's, and then sets the step time
        seconds += passes * s.arch.linear_params / (cal.DEQUANT_WEIGHTS_PER_S_PER_TBS * s.gpu.bandwidth_tbs)
        host = passes * s.arch.layers * cal.QLORA_HOST_SECONDS_PER_LAYER_PASS
        if host > seconds:
            notes.append(f"host-bound: launching QLoRA's kernels one by one takes ~{host:.2f} s per micro-batch, "
                         f"more than the GPU's {seconds:.2f} s")
            seconds = host
    weight_bytes = s.arch.total_params * (cal.QLORA_BYTES_PER_WEIGHT if s.method == "qlora" else s.weight_bytes)
    if s.offload_params:
        seconds += passes * weight_bytes / s.world / (cal.OFFLOAD_GBS[s.zero3_fetch] * 1e9)
    if s.shards_weights and s.nodes > 1:
        # every pass gathers the other nodes' shards through each node's network link; overlapped with compute
        between_nodes = passes * weight_bytes * (s.nodes - 1) / s.nodes * s.gpus_per_node / s.gpus_per_node
        network = between_nodes / (s.internode_gbs * 1e9)
        if network > seconds:
            notes.append(f"bound by the network between nodes ({network:.1f} s of parameter traffic per micro-batch)")
        seconds = max(seconds, network)
    return seconds, notes


def estimate(s: Scenario) -> Estimate:
    parts, load_peak, host = memory(s)
    training = sum(parts.values())
    peak = max(training, load_peak)
    needed = peak * cal.ALLOCATOR_SLACK + cal.CUDA_CONTEXT_GIB
    fits_training = training * cal.ALLOCATOR_SLACK + cal.CUDA_CONTEXT_GIB <= s.gpu.memory_gib
    seconds, notes = step_time(s)
    if load_peak > training:
        notes.append(f"the peak is at loading: each worker holds the whole base model ({load_peak:.1f} GiB) on its "
                     f"GPU before sharding it; training itself needs {training:.1f} GiB")
    tokens_per_second = s.tokens / seconds
    mfu = None
    if s.method != "full":
        mfu = tokens_per_second * (4 * s.arch.matmul_weights + 6 * s.arch.layers * s.arch.hidden * s.seq_len) \
            / (s.gpu.bf16_tflops * 1e12)
    return Estimate(s, parts, load_peak, training, fits_training, peak, needed, needed <= s.gpu.memory_gib, host,
                    tokens_per_second,
                    seconds * s.grad_accum, mfu, notes)


def effective_fraction(s: Scenario) -> float:
    """Real (non-pad) tokens per token slot, for Alpaca-like lengths (ANCHORS.md W3)."""
    if s.packing:
        return cal.PACKED_REAL_FRACTION
    import math

    points = sorted((math.log2(k), v) for k, v in cal.PAD_REAL_FRACTION.items())
    x = math.log2(max(1, s.sequences))  # rows of one micro-batch
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]  # beyond the largest measured micro-batch: no better


def alternatives(base: Scenario, limit: int = 5) -> list[Estimate]:
    """Setups that fit, fastest (in real tokens per second) first."""
    engines = [("single", 3, "none")] if base.world == 1 else [
        ("ddp", 3, "none"), ("fsdp", 3, "none"), ("deepspeed", 2, "none"), ("deepspeed", 3, "none"),
        ("deepspeed", 3, "optimizer"), ("deepspeed", 3, "all")]
    found = []
    # pairs pack within each micro-batch (data.pairs), which this model does not capture: none suggested for them
    packings = {base.packing, True} if base.objective == "sft" else {False}
    for (strategy, stage, offload), mb, (ckpt, every), packing in itertools.product(
            engines, (1, 2, 4, 8, 16), ((False, 1), (True, 1), (True, 2), (True, 4)), packings):
        if base.method == "qlora" and strategy == "deepspeed" and offload != "none":
            continue
        if base.reference_pass and base.method == "full" and strategy not in ("single", "ddp"):
            continue  # the frozen reference copy is not sharded (zerotune.objectives.step)
        candidate = replace(base, strategy=strategy, zero_stage=stage, offload=offload, micro_batch=mb,
                            checkpointing=ckpt, checkpoint_every=every, packing=packing,
                            sharded_loading=(strategy == "fsdp" or stage == 3) and base.method != "qlora")
        result = estimate(candidate)
        if result.fits:
            found.append(result)
    found.sort(key=lambda e: -e.tokens_per_second_per_gpu * effective_fraction(e.scenario))
    return found[:limit]
