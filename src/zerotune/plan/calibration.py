"""Constants of `zerotune plan`, each fitted to a measurement stored in benchmarks/results (named beside it).
tests/test_plan.py predicts every stored measurement again, so a change here that breaks accuracy fails CI.

Efficiency model: the GPU runs a step's hardware FLOPs at peak x E_MAX x T / (T + T_HALF), T = tokens per
micro-batch (small micro-batches leave the GPU under-fed), times a factor for the code path and the engine.
"""

# compiled layers + mixed precision + chunked loss, one GPU (2026-11-28-h200-w1.json: 14,624 tok/s at T=2048;
# 2026-11-28-h200-w1-ckpt.json: 11,655 tok/s at T=8192 with recompute). Solving both: E_MAX, T_HALF.
E_MAX = 0.5216
T_HALF = 526

# Code-path factors, relative to the compiled + mixed-precision path.
PATH_FACTOR = {
    # --no-mixed-precision, compiled: 12,325 vs 14,624 tok/s (2026-11-28-h200-w1-before-autocast.json vs w1.json)
    ("compiled", "fp32_lora"): 0.843,
    ("compiled", "bf16_lora"): 1.0,
    # eager with fp32 LoRA: one GPU, mb 4, checkpointing, 6,396 tok/s (2026-11-28-h200x2-engines-verification.json)
    ("eager", "fp32_lora"): 0.551,
    # eager with bf16 LoRA math: the two measured factors combined (not measured on its own)
    ("eager", "bf16_lora"): 0.551 / 0.843,
}

# Engine factors per GPU, relative to one GPU on the same path (same-run measurements).
ENGINE_FACTOR = {
    "single": 1.0,
    "ddp": 0.99,  # 6,311 vs 6,396 (2 GPUs, engines-verification); 5,752 vs 5,806 (4x H100, weak-scaling)
    # FSDP2 casts LoRA weights to bf16 once per layer (its mixed-precision policy); eager: 8,150 vs 7,587
    # (the one-GPU eager run with bf16 LoRA math), compiled: 9,963 vs 11,655 (2026-11-28-h200x2-w4-fsdp.json)
    ("fsdp", "eager"): 1.074,
    ("fsdp", "compiled"): 0.855,
    # DeepSpeed's bf16 engine holds LoRA weights in bf16. ZeRO-2 8,396, ZeRO-3 with DeepSpeed's per-module
    # hooks 3,048 and 3,318, against 7,587 (engines-verification, zero-variants); ZeRO-3 gathering a decoder
    # layer at a time 6,992 (2026-11-28-h200x2-zero3-layer-fetch.json). Compiled layers under ZeRO-1/2 (one
    # H200, 2026-12-03-h200-w1-ckpt-zero{1,2}-compile-*.json): the compiled path's factor times this one
    # predicts 12,841 against 11,681-12,918 measured, so no separate factor.
    ("deepspeed", 1, None): 1.107,
    ("deepspeed", 2, None): 1.107,
    # ZeRO-3's compute, its gathers counted apart (ZERO3_GATHER_LINK_SHARE): fitted with them below
    ("deepspeed", 3, "module"): 0.49,
    ("deepspeed", 3, "layer"): 0.99,
}

# ZeRO-3 gathers every layer's bf16 weights in each pass, (world - 1) / world of them through the GPU links, and
# the step waits for them: as a share of the link's bandwidth. Fitted with the ZeRO-3 factors above on the 7B
# on 2 H200s (engines-verification, zero-variants, zero3-layer-fetch) and Llama-2-70B LoRA on 2 and 4 H200s
# (2026-11-28-h200x{2,4}-lora-70b-zero3*.json): per-module hooks ran 5.65 s per step on 2 GPUs and 8.15 s on
# 4, the per-GPU compute being the same, which a factor alone cannot say. Per module: 228 GB/s (all five within
# 15%); a decoder layer at a time: 262 GB/s (both within 1%).
ZERO3_GATHER_LINK_SHARE = {"module": 228 / 450, "layer": 262 / 450}

# DeepSpeed's step has a host-side floor (its hooks and optimizer bookkeeping per micro-batch, per decoder
# layer): W1 (micro-batch 1) under ZeRO-2 with compiled layers ran at 12,789 tok/s, 0.160 s per micro-batch,
# where its GPU work predicts 0.126 s, at 577 W of a 700 W cap (2026-12-03-h200-w1-zero2-compile-auto-at-1a9817c).
# Host speed varies: on another H200 host the eager step ran 1.25x slower
# (2026-12-03-h200-w1-zero2-compile-off-at-b40d818-first-host.json).
DEEPSPEED_HOST_SECONDS_PER_LAYER = 0.160 / 32

# Full fine-tuning runs its large weight-gradient matmuls closer to peak than LoRA's path: one GPU, mb 1,
# checkpointing, 6,956 tok/s eager and 8,493 compiled (2026-11-28-h200-full-finetune-{eager,compiled}.json).
FULL_FACTOR = {"eager": 1.426, "compiled": 1.138}

# QLoRA. The GPU dequantises each 4-bit weight once per pass: the dequantisation kernels took 30.7 ms per step
# for 3 passes over 6.48e9 weights on an H200 (2026-11-29-h200-qlora-profile-layer-groups.json, 672 kernels):
# 6.33e11 weights/s, scaled by memory bandwidth. Launched op by op, the 7B step is host-bound (enqueue time =
# wall time, 0.31 s against 0.19 s of GPU work, 2026-11-29-h200-qlora-profile-graphed-step.json): its host
# cost per decoder layer and pass is fitted on 2026-11-28-h200-qlora.json (6,043 tok/s, 0.339 s, 32 layers,
# 3 passes). Up to 80 layers of 8192 or 14848 the GPU's work is the longer one.
DEQUANT_WEIGHTS_PER_S_PER_TBS = 6.33e11 / 4.8
QLORA_HOST_SECONDS_PER_LAYER_PASS = 0.339 / (32 * 3)
QLORA_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + double-quantised absmax

# DeepSpeed parameter offload (the tutorial's JSON), 3 passes over each GPU's 6.7 GB share of the weights per
# step, as effective host<->GPU GB/s per GPU on top of the engine's compute time. Per-module hooks: 1,243 and
# 1,345 tok/s (engines-verification; tutorial-json-layer-fetch's module run), 5.3 fits both within 5%.
# A decoder layer at a time: 2,317 tok/s (2026-11-28-h200x2-tutorial-json-layer-fetch.json).
OFFLOAD_GBS = {"module": 5.3, "layer": 8.5}

# Memory.
# Activations kept per token, layer and element of each linear layer's input and output (bf16): fitted on
# W1 without checkpointing (22.3 GiB, compiled + mixed precision + chunked loss).
ACTIVATION_FACTOR = 0.92
# Eager path with fp32 LoRA inputs, recompute of one layer under checkpointing: not separable in our
# measurements (the logits dominate there); the compiled factor is used.
# --no-mixed-precision (PEFT's fp32 LoRA math) keeps fp32 copies of LoRA inputs: this share of 4 bytes per
# element of every adapted layer's input, fitted on 2026-11-28-h200-w1-before-autocast.json (25.0 GiB).
FP32_LORA_EXTRA = 0.31
LOGIT_BYTES_STOCK = 14  # bf16 logits, their fp32 copy, log-softmax, fp32 gradient (engines-verification single)
# as zerotune.speed.chunked_loss's constants
CHUNK_ELEMENTS = 2**24  # files before e944061 ran with 2**26: 0.3 GiB more
MIN_CHUNK_TOKENS = 512  # files before it ran 2**24 // vocab rows: 130 at 128k
FSDP_LIVE_LAYERS = 2  # the layer in use plus the prefetched one, unsharded
ZERO3_LIVE_LAYERS = 2.3  # fitted: ZeRO-3 13.68 GiB (engines-verification); prefetch and live-parameter buffers
CUDA_CONTEXT_GIB = 0.6  # CUDA context and cuBLAS workspaces: outside torch's allocator statistics
ALLOCATOR_SLACK = 1.05  # fragmentation between allocated and reserved memory
PAD_REAL_FRACTION = {1: 1.0, 4: 0.59, 16: 0.36}  # ANCHORS.md W3: real tokens when padding to the longest
PACKED_REAL_FRACTION = 0.975  # zerotune.data.packing on Alpaca-like lengths (W3 runs)
