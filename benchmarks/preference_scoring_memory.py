"""What one DPO micro-step keeps for its backward, with pairs scored from the full logits and from the chunked
output head (model.chunked_loss): bytes saved for the backward (distinct storages), the largest saved tensor,
the step's time, and on CUDA the peak allocated memory. A random Llama with LoRA, pairs of random tokens (half
prompt, half response).

Usage: python benchmarks/preference_scoring_memory.py [--device cpu|cuda] [--vocab 32000] [--hidden 256]
       [--layers 2] [--pairs 4] [--length 512] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch

from zerotune import adapters
from zerotune.config import AdapterConfig, ObjectiveConfig
from zerotune.data.pairs import EncodedPair, collate_pairs
from zerotune.objectives import create_objective, pair_scorer
from zerotune.objectives.step import Reference
from zerotune.speed.chunked_loss import install_chunked_loss
from zerotune.tiny import build_model


def one_step(model, objective, batch, scorer) -> tuple[float, dict]:
    storages, largest = {}, [0]

    def pack(tensor):
        nbytes = tensor.untyped_storage().nbytes()
        storages[tensor.untyped_storage().data_ptr()] = nbytes
        largest[0] = max(largest[0], tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    device = batch["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    count = scorer.count({key: value.cpu() for key, value in batch.items()})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reference = Reference(types.SimpleNamespace(unwrap=lambda m: m), scorer=scorer).scores(model, batch, count)
        result = objective(scorer(model, batch, count), reference)
        loss = result.terms[0] / (batch["input_ids"].shape[0] // 2)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    report = {"seconds": round(time.perf_counter() - start, 3), "saved_gib": sum(storages.values()) / 2**30,
              "largest_saved_gib": largest[0] / 2**30}
    if device.type == "cuda":
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return float(loss.detach()), report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, args.vocab, (n,), generator=generator).tolist()

    half = args.length // 2
    pairs = [EncodedPair(tokens(half), tokens(half), tokens(half)) for _ in range(args.pairs)]
    batch = {key: value.to(device) for key, value in collate_pairs(pairs, pad_token_id=0).items()}
    objective = create_objective(ObjectiveConfig(name="dpo", beta=0.1))
    results = {}
    for name in ("logits", "chunked"):
        model = build_model("llama", args.vocab, hidden_size=args.hidden, layers=args.layers, heads=4, seed=0)
        model = adapters.apply_method(model.to(device, dtype), AdapterConfig(r=8, dropout=0.0), seed=0).train()
        head = install_chunked_loss(model)[0] if name == "chunked" else None
        one_step(model, objective, batch, pair_scorer(objective, head))  # warm-up
        loss, report = one_step(model, objective, batch, pair_scorer(objective, head))
        results[name] = {"loss": loss, **report}
        del model
    print(json.dumps({"args": vars(args), "torch": torch.__version__, **results}, indent=1))


if __name__ == "__main__":
    main()
