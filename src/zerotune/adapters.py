"""Which parameters train (LoRA, QLoRA or full), saving them, and merging adapters into the base."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zerotune.config import AdapterConfig
from zerotune.errors import ZerotuneError

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


def apply_method(model, config: AdapterConfig, seed: int):
    """Wrap ``model`` for training: PEFT LoRA for lora/qlora, every weight trainable for full."""
    if config.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    # New LoRA weights are drawn from the global RNG: seed it so runs and workers agree.
    torch.manual_seed(seed)
    return get_peft_model(model, lora)


def save_trained(model, state_dict: dict[str, torch.Tensor], output_dir: Path, method: str) -> Path:
    """Write the adapter (lora/qlora) or the full model (full) as safetensors; returns the directory."""
    if method == "full":
        target = output_dir / FULL_MODEL_DIR
        model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        return target
    target = output_dir / ADAPTER_DIR
    model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    return target


def verify_adapter(adapter_dir: Path, expected_tensors: int, expected_elements: int) -> None:
    """A saved adapter must hold every trainable tensor, none empty (the ZeRO-3 empty-adapter bug)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ZerotuneError(f"{path}: adapter weights were not written")
    tensors = elements = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            count = 1
            for size in shape:
                count *= size
            if count == 0:
                raise ZerotuneError(f"{path}: tensor {key} is empty; the adapter was saved before gathering")
            tensors += 1
            elements += count
    if tensors != expected_tensors or elements != expected_elements:
        raise ZerotuneError(
            f"{path}: holds {tensors} tensors / {elements} values, expected {expected_tensors} / {expected_elements}"
        )


def read_run_metadata(adapter_dir: Path) -> dict:
    """The zerotune.json written next to an adapter: template and base model used in training."""
    path = Path(adapter_dir) / "zerotune.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_adapter(base_model, adapter_dir: Path):
    """Fold LoRA weights into the base weights; returns a plain transformers model."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    return peft_model.merge_and_unload()
