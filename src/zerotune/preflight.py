"""Checks that run before any worker starts or any weight loads, so bad input fails in seconds."""

from __future__ import annotations

from pathlib import Path

from zerotune.config import RunConfig, uses_deepspeed
from zerotune.data.batches import BatchPlan
from zerotune.data.prepare import PreparedData, prepare_data
from zerotune.errors import ConfigError
from zerotune.model import check_model_source, load_tokenizer


def check_output_dir(config: RunConfig) -> None:
    """A directory zerotune may write (zerotune.run_dir): its own run or an empty or new one, not locked by
    another run, writable. Changes nothing in it."""
    from zerotune.run_dir import check_owned, check_unlocked, probe_writable

    output_dir = Path(config.output.dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: exists and is not a directory; pick another --output-dir")
    check_unlocked(output_dir)  # first: a run still using it explains everything else about it
    if config.checkpoint.resume:
        from zerotune.checkpoints import check_resumable
        from zerotune.launchers import absolute_paths

        # config.yaml holds the paths as the launcher resolved them: compare this run's resolved the same way, so
        # the same command with a relative --model or --data resumes (from any directory where they name the
        # same files).
        check_resumable(absolute_paths(config), output_dir)
    check_owned(output_dir, "train", config.output.overwrite, config.checkpoint.resume)
    probe_writable(output_dir)


def preflight(config: RunConfig) -> PreparedData:
    """Output dir, data (read, checked, tokenized), batch plan and model source, in that order. Returns the
    tokenized data (for the settings' rules that read its shape)."""
    check_output_dir(config)
    check_workers(config)
    from zerotune.data.prepare import check_data

    pairs = config.objective.name != "sft"  # preference pairs (zerotune.data.pairs)
    if config.data.streaming:  # the stream is read as it trains: here only its first record, and --eval-data
        return preflight_stream(config)
    check_data(config.data, config.train.seed, pairs)  # data errors first: they need no model files
    check_model_source(config.model)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, config.train.seed, pairs=pairs)
    workers = config.distributed.num_workers
    BatchPlan(len(data.train), config.train.batch_size, config.train.grad_accum, workers,
              config.train.seed).check(config.data.path)
    return data


def preflight_stream(config: RunConfig) -> PreparedData:
    from zerotune.data.prepare import load_and_check
    from zerotune.data.streaming import check_stream, streamed_data

    check_stream(config.data)
    if config.data.eval_path:
        load_and_check(config.data, config.data.eval_path)
    check_model_source(config.model)
    data, _ = streamed_data(config.data, load_tokenizer(config.model), 0, 1, lambda value: [value], 1)
    return data


def one_batch_shape(config: RunConfig, data: PreparedData | None = None) -> bool:
    """Whether every batch has one shape without packing's help: every tokenized training example fills
    data.max_seq_len (packing's rows always do). ``data``: already tokenized, else tokenized here."""
    if config.data.packing:
        return True
    if config.objective.name != "sft" or config.data.streaming:  # pairs: padded to the longest of a micro-batch;
        return False  # a stream: not known before it is read
    if data is None:
        data = prepare_data(config.data, load_tokenizer(config.model), config.train.seed)
    return all(len(example.input_ids) == config.data.max_seq_len for example in data.train)


def check_quantization(config: RunConfig, settings) -> None:
    """QLoRA's needs on the resolved device and dtype (bitsandbytes, a GPU or --use-cpu), before any weight loads."""
    if config.adapter.method == "qlora":
        from zerotune.model import DTYPES, qlora_quantization_config

        qlora_quantization_config(DTYPES[settings.dtype], settings.device_type)


def check_workers(config: RunConfig) -> None:
    """Enough CPUs or GPUs for --num-workers, a reachable Ray, and an engine that can run here."""
    import importlib.util
    import os

    import torch

    from zerotune.launchers import choose_launcher
    from zerotune.resolve import check_compile_allowed

    workers = config.distributed.num_workers
    launcher = choose_launcher(config)
    on_gpu = not config.distributed.use_cpu and torch.cuda.is_available()
    if uses_deepspeed(config):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("distributed.strategy deepspeed needs DeepSpeed: pip install 'zerotune[deepspeed]'")
        if config.distributed.deepspeed_config:
            from zerotune.strategies.deepspeed_config import read_user_config, zero_stage

            ds = read_user_config(config.distributed.deepspeed_config)
            for precision in ("fp16", "bf16"):
                if not on_gpu and ds.get(precision, {}).get("enabled") is True:
                    raise ConfigError(f"{config.distributed.deepspeed_config}: {precision}.enabled is true, but this "
                                      f"run is on CPU; set it to \"auto\" or false, or run on GPUs")
            stage, where = zero_stage(ds, config.distributed.zero_stage), config.distributed.deepspeed_config
        else:
            stage, where = config.distributed.zero_stage, "distributed.zero_stage"
        check_compile_allowed(config.model.compile, zero3=stage == 3)
        if config.distributed.sharded_loading and stage != 3:
            raise ConfigError(f"distributed.sharded_loading under DeepSpeed needs ZeRO stage 3 ({where} gives stage "
                              f"{stage}, which keeps whole weights on every worker); use --zero-stage 3")
    if not on_gpu and config.model.dtype == "fp16":
        raise ConfigError("model.dtype fp16 cannot train on CPU; use fp32 (or bf16)")
    if launcher == "ray":
        from zerotune.launchers.ray import available_cpus, available_gpus

        if on_gpu or (not config.distributed.use_cpu and available_gpus(config.distributed.ray_address)):
            have, kind = available_gpus(config.distributed.ray_address), "GPUs in the Ray cluster"
        else:
            have, kind = available_cpus(config.distributed.ray_address), "CPUs in the Ray cluster"
    elif on_gpu:
        have, kind = torch.cuda.device_count(), "GPUs on this machine"
    else:
        have, kind = os.cpu_count() or 1, "CPU cores on this machine"
    if workers > have:
        raise ConfigError(f"distributed.num_workers {workers} is more than the {int(have)} {kind}; "
                          "lower --num-workers" + (" or add --use-cpu" if kind.startswith("GPU") else ""))
