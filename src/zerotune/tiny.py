"""Tiny models and tokenizers built locally, for the offline quickstart and the tests.

They go through the real ``save_pretrained`` / ``from_pretrained`` paths, so everything downstream treats
them exactly like a hub model. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# A minimal chat template (role headers, end-of-turn = EOS) so chat-format data can be tested offline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 600, pad_is_eos: bool = False):
    """Train a byte-level BPE tokenizer on ``texts``; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(architecture: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate_size: int | None = None, seed: int = 0, **extra):
    """A randomly initialised model of a real architecture: llama, falcon, mistral or qwen2."""
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    intermediate_size = intermediate_size or hidden_size * 3
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=heads,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    common.update((key, extra.pop(key)) for key in list(extra) if key in common)  # e.g. a tied head, as Falcon's
    if architecture == "llama":
        config = LlamaConfig(num_hidden_layers=layers, intermediate_size=intermediate_size,
                             num_key_value_heads=kv_heads or heads, max_position_embeddings=2048, **common, **extra)
        return LlamaForCausalLM(config)
    if architecture == "falcon":
        config = FalconConfig(num_hidden_layers=layers, max_position_embeddings=2048, **common, **extra)
        return FalconForCausalLM(config)
    if architecture == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(num_hidden_layers=layers, intermediate_size=intermediate_size,
                               num_key_value_heads=kv_heads or heads, **common, **extra)
        return MistralForCausalLM(config)
    if architecture == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(num_hidden_layers=layers, intermediate_size=intermediate_size,
                             num_key_value_heads=kv_heads or heads, **common, **extra)
        return Qwen2ForCausalLM(config)
    raise ValueError(f"unknown architecture {architecture!r}")


def save_tiny_model(directory: Path, texts: Iterable[str], architecture: str = "llama", vocab_size: int = 600,
                    pad_is_eos: bool = False, **model_kwargs) -> Path:
    """Build tokenizer and model, save both to ``directory`` (safetensors); returns the directory."""
    directory = Path(directory)
    tokenizer = build_tokenizer(texts, vocab_size, pad_is_eos=pad_is_eos)
    model = build_model(architecture, len(tokenizer), **model_kwargs)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
