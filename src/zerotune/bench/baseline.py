"""The stock HF+PEFT side of ``zerotune bench``: transformers model + ``peft.get_peft_model``, eager, SDPA, the
model's own loss, fused AdamW; one process per GPU, under torch DDP when there are several."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

from zerotune.bench.timing import step_spread
from zerotune.bench.workloads import Workload
from zerotune.strategies.process_group import free_port, join_process_group, leave_process_group


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config():
    """LoRA r16 on every linear layer of a block, as on zerotune's side; every baseline uses this one."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)


def base_model(spec: dict, device: torch.device):
    """The workload's model before LoRA: random weights drawn from the seed in the run's dtype on ``device``
    (zerotune's ``model.init=random`` draws the same ones), or, for QLoRA, the saved random weights in NF4 with
    double quantization and bf16 compute. Every baseline starts from this model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if spec["tiny"] else torch.bfloat16
    torch.manual_seed(spec["seed"])
    if spec["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=quant, dtype=dtype,
                                                    device_map={"": device}, attn_implementation="sdpa")
    config = AutoConfig.from_pretrained(spec["model_dir"])
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def baseline_worker(rank: int, world_size: int, spec: dict) -> None:
    """The stock path, one process per GPU (torch DDP when there are several): what TRL/Axolotl users run."""
    from peft import get_peft_model

    from zerotune.data.batches import BatchPlan, collate
    from zerotune.data.encode import EncodedExample

    cuda = torch.cuda.is_available() and not spec["tiny"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world_size > 1:  # the group zerotune's workers join, on loopback (all ranks are on this machine)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        device = join_process_group(use_cpu=not cuda, need_group=True).device
    model = base_model(spec, device)
    if spec["method"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, lora_config())
    model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
    trained = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                                  fused=cuda)
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    examples = [EncodedExample(r["input_ids"], r.get("labels") or r["input_ids"]) for r in records]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = BatchPlan(len(examples), spec["micro_batch"], 1, world_size, spec["seed"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for step in range(spec["steps"]):
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        (indices,) = plan.micro_batches(epoch, in_epoch, rank)
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], 0).items()}
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                       use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        steps.append({"seconds": time.perf_counter() - started, "end": time.time(),
                      "tokens": int(batch["attention_mask"].sum()), "slots": batch["input_ids"].numel(),
                      "label_tokens": int((batch["labels"][:, 1:] != -100).sum()), "loss": loss.item()})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(
        json.dumps({"steps": steps, "peak_gib": peak, "trainable_parameters": trainable}))
    if world_size > 1:
        import torch.distributed as dist

        # DDP's reducer holds the process group. Freed after destroy_process_group, it would drop the group's
        # last reference while holding the GIL, and gloo's worker thread, finishing a work item, waits for the
        # GIL: a deadlock at exit (seen in CI). Free it first, while the group is still registered.
        del trained, model, optimizer
        gc.collect()
        dist.barrier()
        leave_process_group()


def run_baseline(workload: Workload, spec: dict) -> dict:
    if workload.gpus > 1:
        import torch.multiprocessing as mp

        spec["port"] = free_port()
        mp.spawn(baseline_worker, args=(workload.gpus, spec), nprocs=workload.gpus, join=True)
    else:
        baseline_worker(0, 1, spec)
    ranks = [json.loads(Path(spec["out"]).with_suffix(f".rank{r}.json").read_text()) for r in range(workload.gpus)]
    return measured(ranks, spec["warmup"])


def measured(ranks: list[dict], warmup: int) -> dict:
    """One side's figures from its ranks' step records (seconds, end time, tokens, slots, label tokens, loss)."""
    steps = ranks[0]["steps"]
    peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
    # every rank's tokens count; time is the slowest rank's, its total and its steps (they sync each step, so a
    # rank that finishes a step early waits in the next: the per-step maximum over ranks would count that twice)
    timed = slice(warmup, None)
    tokens = sum(sum(s["tokens"] for s in r["steps"][timed]) for r in ranks)
    slowest = max(ranks, key=lambda r: sum(s["seconds"] for s in r["steps"][timed]))
    seconds = sum(s["seconds"] for s in slowest["steps"][timed])
    slots = sum(sum(s["slots"] for s in r["steps"][timed]) for r in ranks)
    per_step = [(sum(r["steps"][i]["tokens"] for r in ranks), slowest["steps"][i]["seconds"])
                for i in range(len(steps))][timed]
    first = steps[timed][0]
    # a preference trainer's batches also count their pairs and each side's response tokens
    pair_counts = {f"timed_{key}": sum(sum(s[key] for s in r["steps"][timed]) for r in ranks)
                   for key in ("pairs", "chosen_tokens", "rejected_tokens") if key in first}
    return {**pair_counts, "tokens_per_second": tokens / seconds, "tokens_per_second_per_gpu": tokens / seconds / len(ranks),
            **step_spread(per_step),
            "peak_gib": max(peaks) if peaks else None, "real_token_fraction": tokens / slots,
            "losses": [sum(r["steps"][i]["loss"] for r in ranks) / len(ranks) for i in range(len(steps))],
            "timed_steps": len(steps[timed]), "timed_tokens": tokens,
            "timed_label_tokens": sum(sum(s["label_tokens"] for s in r["steps"][timed]) for r in ranks),
            "trainable_parameters": ranks[0]["trainable_parameters"],
            "timed_window": [first["end"] - first["seconds"], steps[-1]["end"]]}
