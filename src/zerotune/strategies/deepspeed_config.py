"""Build a DeepSpeed config from ours, or take a user's JSON as-is and fill its "auto" values.

Each "auto" is resolved from the run config (docs/engines-and-launchers.md, 'DeepSpeed "auto" values'):
  train_micro_batch_size_per_gpu      train.batch_size
  gradient_accumulation_steps         train.grad_accum
  train_batch_size                    batch_size x grad_accum x workers
  gradient_clipping                   train.max_grad_norm
  fp16.enabled / bf16.enabled         from the hardware and model.dtype: bf16 where the GPU has it, fp16 on
                                      older GPUs, neither on CPU
  optimizer.params lr/betas/eps/weight_decay   train.lr, (0.9, 0.999), 1e-8, train.weight_decay
  scheduler.params warmup_min_lr / warmup_max_lr / warmup_num_steps   0, train.lr, max(1, warmup_steps)
  scheduler.params total_num_steps    the run's total optimizer steps
  zero_optimization.reduce_bucket_size              hidden_size^2
  zero_optimization.stage3_prefetch_bucket_size     0.9 x hidden_size^2
  zero_optimization.stage3_param_persistence_threshold   10 x hidden_size
  zero_optimization.stage3_gather_16bit_weights_on_model_save   true for --method full
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from zerotune.config import RunConfig
from zerotune.errors import ConfigError

KNOWN_TOP_LEVEL = {
    "fp16", "bf16", "optimizer", "scheduler", "zero_optimization", "gradient_accumulation_steps",
    "gradient_clipping", "steps_per_print", "train_batch_size", "train_micro_batch_size_per_gpu",
    "wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "flops_profiler", "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "amp",
    "tensorboard", "wandb", "csv_monitor", "comms_logger", "aio", "data_types", "checkpoint", "memory_breakdown",
    "seq_parallel_communication_data_type", "compile", "dump_state", "sparse_gradients", "zero_legacy_stage1",
}


def read_user_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: DeepSpeed config not found (--deepspeed)")
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    for key in content:
        if key not in KNOWN_TOP_LEVEL:
            raise ConfigError(f"{file}: unknown DeepSpeed key {key!r}; check its spelling against DeepSpeed's docs")
    stage = content.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        raise ConfigError(f"{file}: zero_optimization.stage {stage!r} does not exist (use 0, 1, 2 or 3)")
    return content


def zero_stage(ds_config: dict[str, Any], configured: int, missing: int = 0) -> int:
    """The ZeRO stage a DeepSpeed JSON (or our preset) runs: its "auto" is distributed.zero_stage (``configured``),
    and no stage is DeepSpeed's own default, 0 (``missing``: the plan, which has no stage-0 engine, reads 3)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", missing)
    return configured if stage == "auto" else int(stage)


def precision_flags(dtype_name: str, device_type: str, bf16_supported: bool) -> tuple[bool, bool]:
    """(fp16, bf16) for DeepSpeed from our dtype setting and the hardware."""
    if device_type != "cuda" or dtype_name == "fp32":
        return False, False
    if dtype_name == "bf16" or (dtype_name == "auto" and bf16_supported):
        return False, True
    return True, False


def preset(config: RunConfig) -> dict[str, Any]:
    """Our own ZeRO config for --strategy deepspeed without a JSON: tuned for speed, offload only if asked."""
    offload = config.distributed.offload
    zero: dict[str, Any] = {
        "stage": config.distributed.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if config.distributed.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": "auto"})
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload in ("params", "all"):
        if config.distributed.zero_stage != 3:
            raise ConfigError("distributed.offload: parameter offload needs ZeRO stage 3 (--zero-stage 3)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def resolve(ds_config: dict[str, Any], config: RunConfig, world_size: int, hidden_size: int, total_steps: int,
            device_type: str, bf16_supported: bool) -> dict[str, Any]:
    """A copy of ``ds_config`` with every "auto" replaced; user-set values are kept."""
    resolved = copy.deepcopy(ds_config)
    train = config.train
    fp16, bf16 = precision_flags(config.model.dtype, device_type, bf16_supported)
    values = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in values.items():
        if resolved.get(key, "auto") == "auto":
            resolved[key] = value
    resolved.setdefault("fp16", {"enabled": "auto"})
    resolved.setdefault("bf16", {"enabled": "auto"})
    _fill(resolved["fp16"], "enabled", fp16)
    _fill(resolved["bf16"], "enabled", bf16)
    if resolved["fp16"]["enabled"] and resolved["bf16"]["enabled"]:
        raise ConfigError("DeepSpeed config enables both fp16 and bf16; enable one")
    if "optimizer" in resolved:
        params = resolved["optimizer"].setdefault("params", {})
        for key, value in {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                           "weight_decay": train.weight_decay}.items():
            _fill(params, key, value)
    if "scheduler" in resolved:
        params = resolved["scheduler"].setdefault("params", {})
        for key, value in {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                           "warmup_num_steps": max(1, train.warmup_steps), "total_num_steps": total_steps}.items():
            _fill(params, key, value)
    zero = resolved.setdefault("zero_optimization", {"stage": 0})
    _fill(zero, "stage", config.distributed.zero_stage)
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", "auto")
    for key, value in {"reduce_bucket_size": hidden_size * hidden_size,
                       "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "stage3_param_persistence_threshold": 10 * hidden_size,
                       "stage3_gather_16bit_weights_on_model_save": config.adapter.method == "full"}.items():
        _fill(zero, key, value)
    # Our loop may hand DeepSpeed a torch optimizer even with optimizer offload.
    resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    leftover = _find_auto(resolved)
    if leftover:
        raise ConfigError(f"DeepSpeed config: no rule to resolve \"auto\" for {leftover}; set a value")
    return resolved


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    """Replace an "auto" the user wrote; keys the user left out stay out (DeepSpeed's defaults apply)."""
    if section.get(key) == "auto":
        section[key] = value


def _find_auto(tree: Any, prefix: str = "") -> str | None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif tree == "auto":
        return prefix.rstrip(".")
    return None
