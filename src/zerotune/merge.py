"""``zerotune merge``: base + adapter -> one Hugging Face model in safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

from zerotune.adapters import merge_adapter
from zerotune.errors import ConfigError
from zerotune.model import DTYPES


def merge_to_directory(model_name: str, adapter_dir: str, output_dir: Path, dtype: str, overwrite: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{output_dir}: already exists and is not empty; pass --overwrite or pick another")
    from zerotune.config import ModelConfig
    from zerotune.model import check_model_source

    from zerotune.pairing import check_adapter_fits

    check_adapter_fits(model_name, adapter_dir, check_model_source(ModelConfig(name=model_name)))
    base = AutoModelForCausalLM.from_pretrained(model_name, dtype=DTYPES[dtype])
    merged = merge_adapter(base, Path(adapter_dir))
    if output_dir.exists() and overwrite:
        shutil.rmtree(output_dir)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer_source = adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else model_name
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(output_dir)
