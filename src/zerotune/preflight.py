"""Checks that run before any worker starts or any weight loads, so bad input fails in seconds."""

from __future__ import annotations

from pathlib import Path

from zerotune.config import RunConfig
from zerotune.data.batches import BatchPlan
from zerotune.data.prepare import prepare_data
from zerotune.errors import ConfigError
from zerotune.model import check_model_source, load_tokenizer


def check_output_dir(config: RunConfig) -> None:
    output_dir = Path(config.output.dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: exists and is not a directory; pick another --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not config.output.overwrite:
        raise ConfigError(f"{output_dir}: output directory already holds a run; pass --overwrite or pick another")


def preflight(config: RunConfig) -> None:
    """Output dir, data (read, checked, tokenized), batch plan and model source, in that order."""
    check_output_dir(config)
    if config.adapter.method == "qlora":
        from zerotune.model import qlora_quantization_config, resolve_dtype

        qlora_quantization_config(resolve_dtype(config.model.dtype, "cuda"))
    from zerotune.data.prepare import load_and_check

    load_and_check(config.data, config.data.path)  # data errors first: they need no model files
    if config.data.eval_path:
        load_and_check(config.data, config.data.eval_path)
    check_model_source(config.model)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    workers = config.distributed.num_workers
    BatchPlan(len(data.train), config.train.batch_size, config.train.grad_accum, workers,
              config.train.seed).check(config.data.path)
