"""Workload W3 (ANCHORS.md): short Alpaca-like examples, effective (non-pad) tokens/s, one GPU, same run.

Baseline: HF+PEFT as the tutorial trained, micro-batch 4 padded to the longest example, attention mask,
labels -100 on padding, SDPA, no checkpointing. zerotune: the same model and LoRA, examples packed into
rows of 2048 by zerotune.data.packing (attention kept per example through position ids), one row per
micro-batch, zerotune's loss (token_loss_sum). Llama-2-7B architecture, random bf16 weights, LoRA r16 alpha 32
on all 7 linear layers, fused AdamW. Lengths lognormal, median 150, mean ~190, clipped to 16..1024.

Usage: python benchmarks/w3_packing.py --out DIR [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def lengths(count: int, seed: int = 0) -> list[int]:
    from zerotune.bench.workloads import lengths as w3_lengths

    return w3_lengths(count, 2048, seed)  # the same draw `zerotune bench w3` makes


def build():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    return model


def timed(model, batches, loss_fn) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    real, seconds = 0, 0.0
    for index, batch in enumerate(batches):
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= 3:  # warm-up steps excluded
            seconds += time.perf_counter() - started
            real += int(batch["attention_mask"].sum())
    slots = sum(b["input_ids"].numel() for b in batches[3:])
    return {"effective_tokens_per_second": real / seconds, "real_token_fraction": real / slots,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "timed_steps": len(batches) - 3}


def short_examples(count: int, rng: random.Random) -> list:
    """Random-token examples with W3's lengths: a third prompt (not a target), the rest response."""
    from zerotune.data.encode import IGNORE_INDEX, EncodedExample

    examples = []
    for n in lengths(count):
        ids = [rng.randrange(3, 32000) for _ in range(n)]
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return examples


def hf_loss(model, batch):
    """What HF+PEFT users run: the model's own loss from labels, with the attention mask."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def zerotune_loss(model, batch):
    from zerotune.step import token_loss_sum

    loss_sum, tokens = token_loss_sum(model, batch)
    return loss_sum / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from zerotune.data.batches import collate
    from zerotune.data.packing import pack_examples

    examples = short_examples(4 * args.steps + 16 * args.steps, random.Random(1))
    baseline_batches = [collate(examples[i:i + 4], 0) for i in range(0, 4 * args.steps, 4)]
    rows, report = pack_examples(examples, 2048)
    packed_batches = [collate([row], 0) for row in rows[:args.steps]]

    model = build()
    results = {"workload": "W3: short examples, effective tokens/s (Llama-2-7B arch, LoRA r16 all-linear, 1 GPU)",
               "gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": os.environ.get("ZEROTUNE_COMMIT", "unknown"),
               "command": "python benchmarks/w3_packing.py " + " ".join(sys.argv[1:]),
               "packing": report.summary()}
    results["baseline_hf_peft_pad_to_longest_mb4"] = timed(model, baseline_batches, hf_loss)
    results["zerotune_packed_2048_mb1"] = timed(model, packed_batches, zerotune_loss)
    results["ratio_effective_tokens_per_second"] = (results["zerotune_packed_2048_mb1"]["effective_tokens_per_second"]
                                                    / results["baseline_hf_peft_pad_to_longest_mb4"]["effective_tokens_per_second"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "w3_packing.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
