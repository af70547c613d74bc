"""Generation with a base model and, optionally, a trained adapter, using the training template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zerotune.adapters import read_run_metadata
from zerotune.data.templates import check_template_name, get_alpaca_template
from zerotune.errors import ConfigError, DataError


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    num_beams: int = 1

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs


def resolve_template(requested: str | None, adapter_dir: str | None, record: dict | None = None) -> str:
    """Explicit --template wins; else the template recorded with the adapter; else alpaca.
    A run trained with 'auto' used alpaca_es for records marked lang=es, and so does generation."""
    name = requested
    if name is None and adapter_dir:
        name = read_run_metadata(Path(adapter_dir)).get("template")
    name = name or "alpaca"
    check_template_name(name)
    if name == "tokens":
        raise ConfigError("template tokens (pre-tokenized training data) has no prompt format to generate with; "
                          "pass --template alpaca, alpaca_es or chat")
    if name == "auto":
        return "alpaca_es" if (record or {}).get("lang") == "es" else "alpaca"
    return name


def pick_device(name: str) -> str:
    """auto: cuda when a GPU is visible, else cpu. cuda without one is an error now, not after the model loads."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch here; pass --device cpu (or auto)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_pairing(model_name: str, adapter_dir: str | None, trust_remote_code: bool = False) -> None:
    """The base model can be read, and the adapter (if any) fits it: before any weight loads."""
    from zerotune.config import ModelConfig
    from zerotune.model import check_model_source
    from zerotune.pairing import check_adapter_fits

    if adapter_dir and not Path(adapter_dir, "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: not an adapter directory (no adapter_config.json); check --adapter")
    model_config = check_model_source(ModelConfig(name=model_name, trust_remote_code=trust_remote_code))
    if adapter_dir:
        check_adapter_fits(model_name, adapter_dir, model_config, trust_remote_code)


def load_generation_tokenizer(model_name: str, adapter_dir: str | None, trust_remote_code: bool = False):
    """The adapter's saved tokenizer when it has one, else the base's; padded on the left."""
    from transformers import AutoTokenizer

    tokenizer_source = adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file() \
        else model_name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge
    return tokenizer


def load_for_generation(model_name: str, adapter_dir: str | None, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", trust_remote_code: bool = False, tokenizer=None):
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = load_generation_tokenizer(model_name, adapter_dir, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.to(device).eval()
    return model, tokenizer


def render_prompt(record: dict, template: str, tokenizer) -> str:
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"--template chat: the tokenizer of {tokenizer.name_or_path} has no chat template; "
                              "pass --template alpaca (or the template the adapter was trained with)")
        messages = record.get("messages") or [{"role": "user", "content": record["instruction"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return get_alpaca_template(template).render_prompt(record["instruction"], record.get("input") or "")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], options: SamplingOptions, batch_size: int = 8) -> list[str]:
    """Responses for ``prompts``: new text only, cut at EOS."""
    outputs = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
        generated = model.generate(
            **encoded, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **options.generate_kwargs(),
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def read_prompt_file(path: str) -> list[dict]:
    """A .jsonl of {"instruction": ..., "input": ...} records, or plain text with one instruction a line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: prompts file not found")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file} line {number}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict) or not (record.get("instruction") or record.get("messages")):
                raise DataError(f'{file} line {number}: missing field "instruction"')
        else:
            record = {"instruction": line.strip()}
        records.append(record)
    if not records:
        raise DataError(f"{file}: no prompts in the file")
    return records
