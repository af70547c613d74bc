"""``zerotune merge``: base + adapter -> one Hugging Face model in safetensors."""

from __future__ import annotations

from pathlib import Path

from zerotune.adapters import merge_adapter
from zerotune.errors import ConfigError
from zerotune.model import DTYPES


def merge_to_directory(model_name: str, adapter_dir: str, output_dir: Path, dtype: str, overwrite: bool) -> None:
    """The output directory is checked (zerotune.run_dir: never a training run, never files zerotune did not write,
    writable) before the base model loads, and locked while it is written; --overwrite replaces only an earlier
    merge's files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zerotune.run_dir import check_owned, check_unlocked, claim_output_dir, probe_writable

    if not Path(adapter_dir, "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    check_owned(output_dir, "merge", overwrite)
    check_unlocked(output_dir)
    probe_writable(output_dir)
    from zerotune.config import ModelConfig
    from zerotune.model import check_model_source

    from zerotune.pairing import check_adapter_fits

    check_adapter_fits(model_name, adapter_dir, check_model_source(ModelConfig(name=model_name)))
    base = AutoModelForCausalLM.from_pretrained(model_name, dtype=DTYPES[dtype])
    merged = merge_adapter(base, Path(adapter_dir))
    with claim_output_dir(output_dir, "merge", overwrite):
        merged.save_pretrained(output_dir, safe_serialization=True)
        tokenizer_source = adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else model_name
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(output_dir)
