"""The named workloads of ``zerotune bench``, their architectures and token data, and LoRA-MFU's accounting."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

ARCHITECTURES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, per GPU


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    architecture: str = "llama-2-7b"
    seq_len: int = 2048
    micro_batch: int = 1
    checkpointing: bool = False
    short_examples: bool = False  # W3: lognormal lengths; baseline pads to the longest, zerotune packs
    gpus: int = 1
    method: str = "lora"
    objective: str = "sft"  # dpo: seq_len is prompt + response, half each; micro_batch counts pairs
    baselines: tuple[str, ...] = ("hf", "trl", "liger", "unsloth")  # what it can be compared with; the first is
    # the default


PAIR_DESCRIPTION = ("Llama-2-7B arch, LoRA r16 all-linear, pairs of a 512-token prompt and 512-token chosen and "
                    "rejected responses, sigmoid loss beta 0.1, reference = the adapter off, against TRL's "
                    "DPOTrainer with PEFT")


WORKLOADS = {w.name: w for w in [
    Workload("w1", "W1: Llama-2-7B arch, LoRA r16 all-linear, seq 2048, micro-batch 1, no checkpointing"),
    Workload("w1-ckpt", "W1: Llama-2-7B arch, LoRA r16 all-linear, seq 2048, micro-batch 4, gradient checkpointing",
             micro_batch=4, checkpointing=True),
    Workload("w2", "W2: Llama-3-8B arch (128k vocabulary), LoRA r16 all-linear, seq 2048, micro-batch 1",
             architecture="llama-3-8b"),
    Workload("w3", "W3: Alpaca-like lengths (lognormal, median 150, 16-1024), effective tokens/s: HF pads "
                   "micro-batches of 4 to the longest, zerotune packs rows of 2048", short_examples=True,
             micro_batch=4),
    Workload("w4", "W4: two GPUs, Llama-2-7B arch, LoRA r16, seq 2048, micro-batch 4, checkpointing; "
                   "HF+PEFT under torch DDP vs zerotune", micro_batch=4, checkpointing=True, gpus=2),
    Workload("qlora", "QLoRA: Llama-2-7B arch, NF4 + double quant, bf16 compute, seq 2048, micro-batch 1, "
                      "checkpointing; HF path with prepare_model_for_kbit_training", checkpointing=True,
             method="qlora"),
    Workload("qlora-mb4", "QLoRA as above, micro-batch 4", micro_batch=4, checkpointing=True, method="qlora"),
    Workload("dpo", f"DPO: {PAIR_DESCRIPTION}; micro-batch 2 pairs, no checkpointing (zerotune's default)",
             seq_len=1024, micro_batch=2, objective="dpo", baselines=("trl",)),
    Workload("dpo-ckpt", f"DPO: {PAIR_DESCRIPTION}; micro-batch 4 pairs, gradient checkpointing", seq_len=1024,
             micro_batch=4, checkpointing=True, objective="dpo", baselines=("trl",)),
]}


def tiny_version(workload: Workload) -> Workload:
    return replace(workload, architecture="tiny", seq_len=128, method="lora")


def lengths(count: int, seq_len: int, seed: int) -> list[int]:
    """W3's lengths: lognormal, median 150 and mean ~190 tokens, clipped to 16..1024 (scaled to seq_len/2048)."""
    rng = random.Random(seed)
    scale = seq_len / 2048
    sigma = math.sqrt(2 * math.log(190 / 150))  # lognormal mean / median = exp(sigma^2 / 2)
    return [max(max(2, round(16 * scale)), min(round(1024 * scale),
                                                round(scale * rng.lognormvariate(math.log(150), sigma))))
            for _ in range(count)]


def pair_lengths(workload: Workload) -> tuple[int, int]:
    """A DPO workload's prompt and response lengths in tokens: each sequence (prompt + response) is seq_len."""
    return workload.seq_len // 2, workload.seq_len - workload.seq_len // 2


def token_records(workload: Workload, vocab_size: int, count: int, seed: int) -> list[dict]:
    """Random-token records: full rows (labels = inputs), W3's short examples with a third as prompt, or for a
    preference objective pairs of a prompt and two responses of pair_lengths (TRL's tokenized field names)."""
    rng = random.Random(seed)
    if workload.objective != "sft":
        prompt, response = pair_lengths(workload)
        return [{"prompt_ids": [rng.randrange(4, vocab_size) for _ in range(prompt)],
                 "chosen_ids": [rng.randrange(4, vocab_size) for _ in range(response)],
                 "rejected_ids": [rng.randrange(4, vocab_size) for _ in range(response)]} for _ in range(count)]
    if not workload.short_examples:
        return [{"input_ids": [rng.randrange(4, vocab_size) for _ in range(workload.seq_len)]} for _ in range(count)]
    records = []
    for n in lengths(count, workload.seq_len, seed):
        ids = [rng.randrange(4, vocab_size) for _ in range(n)]
        records.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return records


def matmul_weights(arch: dict) -> int:
    """N of ANCHORS.md: every matmul weight, the output head included."""
    d, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    kv = d // arch["num_attention_heads"] * arch["num_key_value_heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * inter) + arch["vocab_size"] * d


def lora_mfu(tokens_per_second: float, arch: dict, seq_len: int, gpu: str, reference: bool = False) -> float | None:
    """tokens/s x (4N + 6 L d s) / peak: model FLOPs of LoRA (no weight gradients of frozen weights); with
    ``reference`` (DPO) each token also goes through the reference forward, 2N + 2 L d s more."""
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)
    if peak is None:
        return None
    attention = arch["num_hidden_layers"] * arch["hidden_size"] * seq_len
    flops = 4 * matmul_weights(arch) + 6 * attention
    if reference:
        flops += 2 * matmul_weights(arch) + 2 * attention
    return tokens_per_second * flops / peak
