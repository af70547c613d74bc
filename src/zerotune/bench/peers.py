"""The peers ``zerotune bench --baseline`` measures besides the stock HF+PEFT loop: what users who care about speed
run instead. Each is set up the way its own documentation recommends for speed, on the workload's model (the
same random weights as HF+PEFT's, LoRA r16 on every linear layer of a block), data, precision and optimizer:

  trl      TRL's ``SFTTrainer`` with ``peft_config``, bf16; for W3 ``packing`` (best-fit decreasing, which turns on
           ``padding_free``) into rows of the workload's length, as TRL's docs recommend for speed
  liger    transformers' ``Trainer`` with ``use_liger_kernel`` (liger-kernel's RoPE, RMSNorm, SwiGLU and fused
           linear cross-entropy patched into the model) and bf16; W3 flattens each batch without padding
           (``DataCollatorWithFlattening``, transformers' padding-free collator)
  unsloth  Unsloth's ``FastLanguageModel`` and its ``get_peft_model`` (its own gradient checkpointing,
           ``"unsloth"``, where the workload checkpoints), trained by TRL's ``SFTTrainer`` as Unsloth's docs do;
           W3 packs as for trl

Every peer trains with fused AdamW at a constant 1e-4, no weight decay, gradient clipping at 1.0 (zerotune's
default), and batches in the order HF+PEFT sees them (non-packed workloads: the same first batch, so the same
step-1 loss). A step is timed from the end of the previous one to the end of its own (CUDA synchronized), so a
trainer's own work between steps counts, as it does for zerotune.

Each peer runs in its own process (``main`` below): liger and Unsloth patch
transformers' classes for the whole process, and Unsloth must be imported before transformers. A peer that is not
installed, cannot run on this machine or cannot do the workload writes why instead of figures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

PEER_NAMES = ("trl", "liger", "unsloth")
OBJECTIVE_TRAINERS = {"dpo": "TRL DPOTrainer"}  # trl's description on a preference workload


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    modules: tuple[str, ...]  # imported first, in this order: an import error means "not available"
    packages: tuple[str, ...]  # distributions whose versions the result names
    needs_cuda: str | None = None  # why the peer cannot run on the CPU, where it cannot


PEERS = {peer.name: peer for peer in [
    Peer("trl", "TRL SFTTrainer", ("trl",), ("trl", "transformers", "peft", "accelerate", "torch")),
    Peer("liger", "HF Trainer + Liger kernels", ("liger_kernel.transformers",),
         ("liger-kernel", "transformers", "peft", "accelerate", "torch", "triton"),
         needs_cuda="liger-kernel's kernels are Triton GPU kernels and need a CUDA GPU"),
    Peer("unsloth", "Unsloth", ("unsloth", "trl"),
         ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "accelerate", "torch", "triton", "xformers"),
         needs_cuda="Unsloth's training kernels need a GPU"),
]}


def versions(peer: Peer) -> dict:
    found = {}
    for package in peer.packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def unavailable(peer: Peer, spec: dict) -> str | None:
    """Why ``peer`` cannot run here (its import's exact error, or no GPU), or None. Imports it: Unsloth first."""
    missing = [m for m in peer.modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        return (f"not available on this machine: {', '.join(missing)} is not installed (pip install "
                f"'zerotune[peers]' installs trl; liger-kernel and unsloth need a CUDA GPU)")
    cuda = torch.cuda.is_available() and not spec["tiny"]
    if peer.needs_cuda and not cuda:
        return f"not available on this machine: {peer.needs_cuda}" + (" (--tiny runs on the CPU)" if spec["tiny"]
                                                                         else "")
    for module in peer.modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # an import can fail in many ways (missing module, version checks, no driver)
            return f"not available on this machine: import {module}: {type(error).__name__}: {error}"
    return None


def cannot_do(peer_name: str, workload_gpus: int) -> str | None:
    """Workloads the peer harness does not run: it measures peers in one process on one GPU."""
    if workload_gpus > 1:
        return (f"not measured: this workload runs on {workload_gpus} GPUs and bench runs peers on one GPU "
                f"in one process (a multi-GPU {peer_name} run needs its own launcher)")
    return None


# ------------------------------------------------------------------------------------------ measuring
class StepRecorder:
    """A trainer's steps as bench counts them: tokens, label tokens and loss from each batch the trainer trains
    on, and each step's time from a callback (CUDA synchronized at every step's end)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.batches: list[dict] = []  # real tokens, slots, label tokens, loss (and a pair batch's counts)
        self.seconds: list[float] = []
        self.ends: list[float] = []
        self.last: float | None = None

    def batch(self, inputs: dict, loss: torch.Tensor) -> None:
        ids = inputs["input_ids"]
        # padded batches carry an attention mask; padding-free ones (flattened or packed rows) hold no padding
        real = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel())
        record = {"tokens": real, "slots": ids.numel(), "loss": loss.detach()}
        if "labels" in inputs:
            record["label_tokens"] = (inputs["labels"][:, 1:] != -100).sum()
        else:  # TRL's preference batch: the chosen rows, then the rejected ones; completion_mask marks responses
            chosen, rejected = (inputs["completion_mask"][:, 1:] != 0).sum(1).chunk(2)
            record |= {"label_tokens": chosen.sum() + rejected.sum(), "chosen_tokens": chosen.sum(),
                       "rejected_tokens": rejected.sum(), "pairs": len(chosen)}
        self.batches.append(record)  # device tensors until the end

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if recorder.cuda:
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                if recorder.last is None:
                    recorder.last = recorder.now()

            def on_step_end(self, args, state, control, **kwargs):
                now = recorder.now()
                recorder.seconds.append(now - recorder.last)
                recorder.ends.append(time.time())
                recorder.last = now

        return StepClock()

    def steps(self) -> list[dict]:
        if len(self.batches) != len(self.seconds):
            raise RuntimeError(f"{len(self.batches)} batches trained in {len(self.seconds)} optimizer steps: "
                               "bench expects one batch per step")
        return [{"seconds": seconds, "end": end,
                 **{key: float(value) if key == "loss" else int(value) for key, value in batch.items()}}
                for batch, seconds, end in zip(self.batches, self.seconds, self.ends)]


def recording(trainer_class, recorder: StepRecorder):
    """``trainer_class`` with each training step's batch and loss handed to ``recorder``."""

    class Recorded(trainer_class):
        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            recorder.batch(inputs, loss)
            return loss

    return Recorded


def plan_order(records: list[dict], spec: dict) -> list[dict]:
    """The records in the order HF+PEFT trains on them (zerotune's batch plan), for a sequential sampler."""
    from zerotune.data.batches import BatchPlan

    plan = BatchPlan(len(records), spec["micro_batch"], 1, 1, spec["seed"])
    ordered = []
    for step in range(spec["steps"]):
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        (indices,) = plan.micro_batches(epoch, in_epoch, 0)
        ordered += [records[i] for i in indices]
    return ordered


def training_arguments(spec: dict, cuda: bool, micro_batch: int) -> dict:
    """What every Trainer-based peer shares: the workload's steps, batch, optimizer and precision."""
    checkpointing = spec["checkpointing"]
    return {
        "output_dir": str(Path(spec["work"]) / "peer-run"), "max_steps": spec["steps"],
        "per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "optim": "adamw_torch_fused" if cuda else "adamw_torch", "max_grad_norm": 1.0,
        "bf16": cuda, "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "train_sampling_strategy": "sequential", "seed": spec["seed"], "data_seed": spec["seed"],
        "logging_steps": spec["steps"], "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0, "use_cpu": not cuda,
    }


def sft_dataset(spec: dict, packing: bool):
    """Pre-tokenized rows for TRL (it skips tokenizing a dataset with ``input_ids``); ``labels`` keep W3's
    prompt masked. Non-packed: in HF+PEFT's batch order."""
    from datasets import Dataset

    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    rows = [{"input_ids": r["input_ids"], "labels": r.get("labels") or r["input_ids"]} for r in records]
    return Dataset.from_list(rows if packing else plan_order(rows, spec))


def run_sft(spec: dict, model, cuda: bool, peft_config=None, **extra) -> tuple[dict, StepRecorder, object]:
    """TRL's SFTTrainer (Unsloth's patched one when Unsloth was imported first) on the workload."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    packing = spec["short_examples"]
    settings = training_arguments(spec, cuda, 1 if packing else spec["micro_batch"])
    settings.update(max_length=spec["seq_len"], packing=packing)
    if packing:
        settings.update(packing_strategy="bfd", padding_free=True)
    settings.update(extra)
    recorder = StepRecorder(cuda)
    trainer = recording(SFTTrainer, recorder)(
        model=model, args=SFTConfig(**settings), train_dataset=sft_dataset(spec, packing),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]), peft_config=peft_config,
        callbacks=[recorder.callback()])
    trainer.train()
    return {**settings, "trainer": type(trainer).__mro__[1].__name__}, recorder, trainer.model


def trl_peer(spec: dict, device: torch.device, cuda: bool):
    from zerotune.bench.baseline import base_model, lora_config

    if spec["objective"] == "dpo":
        from zerotune.bench.dpo import trl_dpo_peer

        return trl_dpo_peer(spec, device, cuda)

    model = base_model(spec, device)
    return run_sft(spec, model, cuda, peft_config=lora_config())


def liger_peer(spec: dict, device: torch.device, cuda: bool):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

    from zerotune.bench.baseline import base_model, lora_config

    model = base_model(spec, device)
    if spec["method"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, lora_config())
    settings = training_arguments(spec, cuda, spec["micro_batch"])
    settings.update(use_liger_kernel=True)
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    rows = [{"input_ids": r["input_ids"], "labels": r.get("labels") or r["input_ids"]} for r in records]
    if spec["short_examples"]:  # each batch flattened into one row, no padding (transformers' padding-free way)
        collator, collator_name = DataCollatorWithFlattening(), "DataCollatorWithFlattening"
    else:
        rows = [dict(row, attention_mask=[1] * len(row["input_ids"])) for row in rows]
        collator, collator_name = default_data_collator, "default_data_collator"
    recorder = StepRecorder(cuda)
    trainer = recording(Trainer, recorder)(
        model=model, args=TrainingArguments(**settings), train_dataset=Dataset.from_list(plan_order(rows, spec)),
        data_collator=collator, callbacks=[recorder.callback()])
    trainer.train()
    return {**settings, "trainer": "Trainer", "data_collator": collator_name}, recorder, trainer.model


def unsloth_peer(spec: dict, device: torch.device, cuda: bool):
    """Unsloth loads from files: the workload's random weights are saved first (drawn as for HF+PEFT)."""
    import unsloth  # noqa: F401  (imported by ``unavailable`` already: before transformers, as Unsloth requires)
    from unsloth import FastLanguageModel

    from zerotune.bench.baseline import LORA_TARGETS, base_model

    weights = Path(spec["model_dir"])
    if spec["method"] != "qlora":  # QLoRA's model directory holds saved random weights already
        weights = Path(spec["work"]) / f"weights-{spec['architecture']}-seed{spec['seed']}"
        if not any(weights.glob("*.safetensors")):
            model = base_model(spec, device)
            model.save_pretrained(weights, safe_serialization=True)
            del model
            torch.cuda.empty_cache()
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(spec["model_dir"]).save_pretrained(weights)
    checkpointing = "unsloth" if spec["checkpointing"] else False
    loading = {"max_seq_length": spec["seq_len"], "dtype": torch.bfloat16, "load_in_4bit": spec["method"] == "qlora",
               "full_finetuning": False, "fix_tokenizer": False, "use_gradient_checkpointing": checkpointing}
    model, _ = FastLanguageModel.from_pretrained(model_name=str(weights), **loading)
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none", "target_modules": LORA_TARGETS,
            "use_gradient_checkpointing": checkpointing, "random_state": spec["seed"],
            "max_seq_length": spec["seq_len"]}
    model = FastLanguageModel.get_peft_model(model, **lora)
    # Unsloth's own checkpointing is set on the model above; the trainer's would wrap it a second time
    settings, recorder, trained = run_sft(spec, model, cuda, gradient_checkpointing=False,
                                          gradient_checkpointing_kwargs=None)
    loading["dtype"] = "bfloat16"
    return {**settings, "from_pretrained": loading, "get_peft_model": lora}, recorder, trained


MEASURE = {"trl": trl_peer, "liger": liger_peer, "unsloth": unsloth_peer}


def run_peer(name: str, spec: dict) -> dict:
    """Run peer ``name`` in a child process (its patches stay there); its figures, or why there are none."""
    import os
    import subprocess

    import zerotune
    from zerotune.bench.baseline import measured

    work = Path(spec["work"])
    spec_path, out_path = work / f"peer-{name}-spec.json", work / f"peer-{name}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    source = str(Path(zerotune.__file__).resolve().parents[1])  # this zerotune, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    entry = "import sys; from zerotune.bench.peers import main; sys.exit(main(sys.argv[1:]))"
    status = subprocess.run([sys.executable, "-c", entry, name, str(spec_path), str(out_path)], env=env).returncode
    if not out_path.is_file():
        return {"error": f"the {name} process exited with status {status} and wrote no result"}
    result = json.loads(out_path.read_text())
    if "steps" not in result:
        return result
    steps = result.pop("steps")
    return {**measured([{"steps": steps, "peak_gib": result.pop("peak_gib"),
                         "trainable_parameters": result.pop("trainable_parameters")}], spec["warmup"]), **result}


def measure(name: str, spec: dict) -> dict:
    """Train the workload with peer ``name`` in this process; its step records, settings and versions."""
    peer = PEERS[name]
    reason = unavailable(peer, spec)
    if reason:
        return {"not_available": reason, "packages": versions(peer)}
    cuda = torch.cuda.is_available() and not spec["tiny"]
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    settings, recorder, model = MEASURE[name](spec, device, cuda)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"steps": recorder.steps(), "peak_gib": peak, "trainable_parameters": trainable,
            "settings": settings, "packages": versions(peer), "description": description(name, spec["objective"])}


def description(name: str, objective: str = "sft") -> str:
    return OBJECTIVE_TRAINERS.get(objective, PEERS[name].description) if name == "trl" else PEERS[name].description


def main(argv: list[str]) -> int:
    name, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = measure(name, spec)
    except Exception as error:  # the exact error goes into the results file, the traceback to the log
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}", "packages": versions(PEERS[name])}
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


