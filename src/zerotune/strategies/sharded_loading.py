"""--sharded-loading for FSDP2: every rank reads only its own rows of each weight from the safetensors files.

The model was built on the meta device and sharded (dim 0, as FSDP2 does); ``to_empty`` allocated the local
shards. Each parameter's rows are read through a memory-mapped slice, so host RAM holds one slice at a time
and no rank ever sees a whole tensor it does not own. LoRA weights are not in the files: A is drawn from a
generator seeded by train.seed (PEFT's distribution: uniform +-1/sqrt(fan_in)), B is zero, and every rank
draws the same full matrix before taking its rows, so the shards agree.

With ``--init random`` nothing is read: every rank draws each base weight whole, on its own device, from one
generator seeded by train.seed, and keeps its rows. The model is then the same for any number of workers
(another draw than the one-process ``--init random``, same distributions as transformers' initialisation of
these architectures: matrices normal(0, initializer_range), norm weights one, biases zero).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from zerotune.errors import ConfigError


def _weight_files(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in mapping.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{directory}: --sharded-loading reads safetensors files, and there are none; "
                          "convert the weights with save_pretrained or drop --sharded-loading")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def checkpoint_name(parameter_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    name = parameter_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _local_rows(parameter) -> slice:
    if not isinstance(parameter, DTensor):
        return slice(0, parameter.shape[0])
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh, parameter.placements)
    return slice(offset[0], offset[0] + shape[0])


def _lora_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if "lora_B" in name:
        return torch.zeros(shape)
    if "lora_A" in name:
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    raise ConfigError(f"--sharded-loading: {name} is neither in the weight files nor a LoRA weight")


def _random_value(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, device=generator.device)
    if len(shape) == 1:  # RMSNorm / LayerNorm scales
        return torch.ones(shape, device=generator.device)
    return torch.empty(shape, device=generator.device).normal_(0.0, std, generator=generator)


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, model_dir: str, seed: int, random_std: float | None = None) -> None:
    """Fill this rank's shards: base weights from the safetensors files in ``model_dir``, or, with
    ``random_std``, drawn whole from a seeded generator on the shards' device (no files needed)."""
    from safetensors import safe_open

    directory = Path(model_dir).expanduser()
    files = _weight_files(directory) if random_std is None else {}
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    base_generator = torch.Generator(device=device).manual_seed(seed + 1) if random_std is not None else None
    with ExitStack() as stack:
        handles = {}
        for name, parameter in model.named_parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            rows = _local_rows(parameter)
            key = checkpoint_name(name)
            if key in files:
                file = files[key]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                piece = handles[file].get_slice(key)[rows]
            elif random_std is not None and "lora_" not in name:
                piece = _random_value(name, parameter.shape, random_std, base_generator)[rows]
            else:
                piece = _lora_value(name, parameter.shape, generator)[rows]
            if tuple(piece.shape) != tuple(local.shape):
                raise ConfigError(f"--sharded-loading: {key} has shape {tuple(piece.shape)} in {directory}, the model "
                                  f"expects {tuple(local.shape)} on this rank; the files do not match config.json")
            local.copy_(piece)
