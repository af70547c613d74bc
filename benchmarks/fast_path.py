"""One GPU, same run: HF+PEFT eager against zerotune's path with --compile (torch.compile per decoder layer).

W1: full 2048-token rows of random tokens, micro-batch 1, no checkpointing (ANCHORS.md's first row).
W3: short examples (lognormal, median 150): HF pads micro-batches of 4 to the longest; zerotune packs rows of
2048 (padded to 2048, one shape, as `zerotune train --packing --compile` does) and compiles. Same model object for all four (HF runs first, then the layers are compiled).
Llama-2-7B architecture, random bf16 weights, LoRA r16 alpha 32 on all 7 linear layers, fused AdamW, SDPA.

Usage: python benchmarks/fast_path.py --out DIR [--steps 12]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w3_packing import build, hf_loss, short_examples, timed, zerotune_loss  # noqa: E402

LORA_FLOPS_PER_TOKEN = 4 * 6.607e9 + 6 * 32 * 4096 * 2048  # ANCHORS.md: 4N + 6 L d s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from zerotune.data.batches import collate
    from zerotune.data.encode import EncodedExample
    from zerotune.data.packing import pack_examples
    from zerotune.speed.compile import compile_layers

    rng = random.Random(1)
    full = [collate([EncodedExample(ids, ids)], 0) for ids in
            ([rng.randrange(3, 32000) for _ in range(2048)] for _ in range(args.steps))]
    short = short_examples(20 * args.steps, rng)
    padded = [collate(short[i:i + 4], 0) for i in range(0, 4 * args.steps, 4)]
    rows, report = pack_examples(short, 2048)
    packed = [collate([row], 0, pad_to=2048) for row in rows[:args.steps]]  # as train does with --compile

    model = build()
    results = {"workload": "W1 and W3, Llama-2-7B arch, LoRA r16 all-linear, 1 GPU, HF eager vs zerotune --compile",
               "gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": os.environ.get("ZEROTUNE_COMMIT", "unknown"),
               "command": "python benchmarks/fast_path.py " + " ".join(sys.argv[1:]), "packing": report.summary()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def record(name, value):
        results[name] = value
        (out / "fast_path.json").write_text(json.dumps(results, indent=1))
        print(name, json.dumps(value), flush=True)

    record("w1_hf_eager_mb1", timed(model, full, hf_loss))
    record("w3_hf_pad_to_longest_mb4", timed(model, padded, hf_loss))
    compile_layers(model.base_model.model)
    record("w1_zerotune_compiled_mb1", timed(model, full, zerotune_loss))
    record("w3_zerotune_packed_compiled_mb1", timed(model, packed, zerotune_loss))
    w1 = results["w1_zerotune_compiled_mb1"]["effective_tokens_per_second"]
    results["w1_ratio"] = w1 / results["w1_hf_eager_mb1"]["effective_tokens_per_second"]
    results["w1_zerotune_lora_mfu"] = w1 * LORA_FLOPS_PER_TOKEN / 989e12
    results["w3_ratio"] = (results["w3_zerotune_packed_compiled_mb1"]["effective_tokens_per_second"]
                           / results["w3_hf_pad_to_longest_mb4"]["effective_tokens_per_second"])
    record("ratios", {"w1": results["w1_ratio"], "w3": results["w3_ratio"]})


if __name__ == "__main__":
    main()
