"""Checks of a whole RunConfig: every number against its field's declared range, then the combinations of fields
that types and ranges alone cannot express. build_config runs them on every config, whatever its source."""

from __future__ import annotations

from zerotune.config import RunConfig, field_specs, uses_deepspeed
from zerotune.errors import ConfigError


def check_ranges(config: RunConfig) -> None:
    """Every number against the range its field declares (``valid``), so YAML, flags and overrides share one
    check; the message names the YAML key, the range, the value and the flag."""
    if config.distributed.zero_stage not in (1, 2, 3):
        raise ConfigError(f"distributed.zero_stage: ZeRO has stages 1, 2 and 3, got {config.distributed.zero_stage} "
                          "(flag --zero-stage)")
    for key, spec, _ in field_specs():
        section, name = key.split(".")
        value, interval = getattr(getattr(config, section), name), spec.metadata.get("valid")
        problem = interval.problem(value) if interval else None
        if problem:
            flag = f" (flag {spec.metadata['flag']})" if spec.metadata.get("flag") else ""
            raise ConfigError(f"{key}: {problem}{flag}")


def validate(config: RunConfig) -> None:
    """The declared ranges, then checks across fields that types and ranges alone cannot express."""
    check_ranges(config)
    if not config.adapter.target_modules:
        raise ConfigError("adapter.target_modules: name at least one module, or all-linear (--lora-target-modules)")
    if config.model.checkpoint_every > 1 and not config.model.gradient_checkpointing:
        raise ConfigError("model.checkpoint_every: picks which layers --gradient-checkpointing recomputes; add "
                          "--gradient-checkpointing or drop --checkpoint-every")
    if config.train.max_steps == 0 and config.train.epochs <= 0:
        raise ConfigError("train.epochs: must be more than 0 when train.max_steps is 0 (--epochs or --max-steps)")
    if config.distributed.no_deepspeed and config.distributed.strategy == "deepspeed":
        raise ConfigError("distributed.strategy: 'deepspeed' contradicts --no-deepspeed; pick one")
    if config.checkpoint.resume and config.output.overwrite:
        raise ConfigError("checkpoint.resume and output.overwrite contradict: --resume continues the run in "
                          "--output-dir, --overwrite deletes it; pick one")
    if config.train.on_nonfinite == "skip" and uses_deepspeed(config):
        raise ConfigError("train.on_nonfinite: skip is not available with DeepSpeed (its engine applies a reduced "
                          "step and cannot drop it); use stop, or another --strategy")
    if config.distributed.sharded_loading and (not (config.distributed.strategy == "fsdp" or uses_deepspeed(config))
                                               or config.adapter.method == "qlora"):
        raise ConfigError("distributed.sharded_loading needs --strategy fsdp or DeepSpeed ZeRO-3 and --method lora "
                          "or full (QLoRA quantizes while loading)")
    if config.objective.name != "sft":
        check_preference_settings(config)
    if config.data.streaming:
        check_streaming_settings(config)
    if config.train.cuda_graph == "on":
        if config.distributed.num_workers != 1 or config.distributed.use_cpu:
            raise ConfigError("train.cuda_graph: needs one worker on a CUDA GPU; drop --cuda-graph, or "
                              "--num-workers/--use-cpu")
        if config.model.compile == "off":
            raise ConfigError("train.cuda_graph: needs compiled layers; drop --compile off or --cuda-graph")
        if config.model.attn_implementation not in ("auto", "sdpa"):
            raise ConfigError(f"train.cuda_graph: needs --attn-implementation sdpa (or auto), got "
                              f"{config.model.attn_implementation}")


def check_preference_settings(config: RunConfig) -> None:
    """What a preference objective does not combine with (yet): step graphs."""
    name = config.objective.name
    if config.train.cuda_graph == "on":
        raise ConfigError(f"train.cuda_graph: not available with --objective {name}; drop --cuda-graph")


def check_streaming_settings(config: RunConfig) -> None:
    """What --streaming needs: a step count (the stream's length is unknown), nothing held out of the stream, one
    SFT dataset (zerotune.data.streaming)."""
    data = config.data
    if config.train.max_steps == 0:
        raise ConfigError("data.streaming: the stream's length is unknown, so give the run a length with --max-steps")
    if config.train.epochs != 1.0:
        raise ConfigError("train.epochs: not used with --streaming (the stream starts again at its end until "
                          "--max-steps); drop --epochs")
    if data.eval_fraction > 0 and not data.eval_path:
        raise ConfigError("data.eval_fraction: --streaming holds nothing out of the stream; pass --eval-fraction 0, "
                          "or --eval-data FILE to evaluate on a separate file")
    if data.mix:
        raise ConfigError("data.mix: mixtures do not stream yet; give one --data, or drop --streaming")
    if config.objective.name != "sft":
        raise ConfigError(f"data.streaming: not available with --objective {config.objective.name} (pairs are read "
                          "whole); drop --streaming")
