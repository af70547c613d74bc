"""The TRL side of ``zerotune bench dpo``: TRL's ``DPOTrainer`` with ``peft_config`` (a new LoRA adapter, so its
reference is the base with the adapter off, as on zerotune's side), sigmoid loss, reference log-probs computed
live (``precompute_ref_log_probs`` off), on the workload's model, pairs, order, optimizer and precision.

TRL tokenizes text pairs itself; bench's pairs are token ids already (the same ids zerotune trains on), so
TRL's dataset preparation is skipped and its own collator (``DataCollatorForPreference``) batches them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch


def length_arguments(config_class, prompt_length: int, response_length: int) -> dict:
    """DPOConfig's length limits under the installed TRL, the one place its versions differ for bench: TRL 1.15
    and 1.16 cap prompt + response with ``max_length`` alone; older TRL also capped the prompt
    (``max_prompt_length``) and the response (``max_completion_length``). No bench pair is cut by them."""
    names = {field.name for field in dataclasses.fields(config_class)}
    lengths = {"max_length": prompt_length + response_length}
    if "max_prompt_length" in names:
        lengths["max_prompt_length"] = prompt_length
    if "max_completion_length" in names:
        lengths["max_completion_length"] = response_length
    return lengths


def pair_dataset(spec: dict):
    """The pairs' token ids in the order zerotune trains on them (its batch plan), for a sequential sampler."""
    from datasets import Dataset

    from zerotune.bench.peers import plan_order

    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    return Dataset.from_list(plan_order(records, spec))


def pretokenized(trainer_class):
    """``trainer_class`` taking a dataset of prompt_ids, chosen_ids and rejected_ids as it is."""

    class PreTokenized(trainer_class):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    return PreTokenized


def trl_dpo_peer(spec: dict, device: torch.device, cuda: bool):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from zerotune.bench.baseline import base_model, lora_config
    from zerotune.bench.peers import StepRecorder, recording, training_arguments

    settings = training_arguments(spec, cuda, spec["micro_batch"])
    settings.update(beta=spec["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False, disable_dropout=True,
                    **length_arguments(DPOConfig, spec["prompt_length"], spec["response_length"]))
    recorder = StepRecorder(cuda)
    trainer = recording(pretokenized(DPOTrainer), recorder)(
        model=base_model(spec, device), args=DPOConfig(**settings), train_dataset=pair_dataset(spec),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]), peft_config=lora_config(),
        callbacks=[recorder.callback()])
    trainer.train()
    return {**settings, "trainer": "DPOTrainer"}, recorder, trainer.model
