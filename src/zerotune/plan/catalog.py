"""What `zerotune plan` knows offline: GPUs, and a small table of popular architectures (a table, not a zoo).
A local model directory's config.json works for anything else of these families."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from zerotune.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch reports as total memory
    bf16_tflops: float  # dense peak, bf16 (fp16 where there is no bf16)
    bandwidth_tbs: float  # HBM/GDDR bandwidth
    link_gbs: float  # GPU-to-GPU within a node (NVLink, else PCIe), GB/s per direction
    bf16: bool = True
    flash_attention: bool = True  # flash-attn 2 needs Ampere or newer


GPUS = {g.name: g for g in [
    GPU("h100", 79.1, 989, 3.35, 450),
    GPU("h200", 139.8, 989, 4.8, 450),
    GPU("a100-80g", 79.2, 312, 2.0, 300),
    GPU("a100-40g", 39.4, 312, 1.55, 300),
    GPU("l40s", 44.4, 362, 0.86, 32),
    GPU("l4", 22.0, 121, 0.3, 32),
    GPU("a10g", 22.0, 70, 0.6, 32),
    GPU("t4", 14.6, 65, 0.32, 16, bf16=False, flash_attention=False),
    GPU("v100", 31.7, 125, 0.9, 150, bf16=False, flash_attention=False),
]}


def find_gpu(name: str) -> GPU:
    key = name.lower().replace("_", "-")
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """'NVIDIA H100 80GB HBM3' -> h100 (for the measurements stored in benchmarks/results)."""
    low = device_name.lower()
    for key in ("h200", "h100", "l40s", "l4", "a10g", "t4", "v100"):
        if key in low:
            return GPUS[key]
    if "a100" in low:
        return GPUS["a100-40g" if "40gb" in low else "a100-80g"]
    return None


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int
    gated_mlp: bool = True  # gate/up/down (Llama, Mistral, Qwen2); else up/down (Falcon)
    fused_qkv: bool = False  # Falcon's query_key_value
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer: what LoRA all-linear adapts."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = [(d, d + 2 * kv), (d, d)] if self.fused_qkv else [(d, d), (d, kv), (d, kv), (d, d)]
        mlp = [(d, i), (d, i), (i, d)] if self.gated_mlp else [(d, i), (i, d)]
        return attention + mlp

    @property
    def linear_params(self) -> int:  # all decoder-layer matmul weights
        return self.layers * sum(a * b for a, b in self.linears())

    @property
    def matmul_weights(self) -> int:  # N of ANCHORS.md: the output head included
        return self.linear_params + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        embedding = 0 if self.tied else self.vocab * self.hidden
        return self.matmul_weights + embedding + (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linears())

    @property
    def activation_elements(self) -> int:
        """Per token and layer: every linear layer's input and output (what the backward pass keeps)."""
        return sum(a + b for a, b in self.linears())


def _llama(name, d, layers, heads, kv, vocab, inter):
    return Architecture(name, d, layers, heads, kv, vocab, inter)


ARCHITECTURES = {a.name: a for a in [
    _llama("llama-2-7b", 4096, 32, 32, 32, 32000, 11008),
    _llama("llama-2-13b", 5120, 40, 40, 40, 32000, 13824),
    _llama("llama-2-70b", 8192, 80, 64, 8, 32000, 28672),
    _llama("llama-3-8b", 4096, 32, 32, 8, 128256, 14336),
    _llama("llama-3-70b", 8192, 80, 64, 8, 128256, 28672),
    _llama("mistral-7b", 4096, 32, 32, 8, 32000, 14336),
    _llama("qwen2.5-7b", 3584, 28, 28, 4, 152064, 18944),
    _llama("qwen2.5-72b", 8192, 80, 64, 8, 152064, 29568),
    Architecture("falcon-7b", 4544, 32, 71, 1, 65024, 4 * 4544, gated_mlp=False, fused_qkv=True, tied=True),
    Architecture("falcon-40b", 8192, 60, 128, 8, 65024, 4 * 8192, gated_mlp=False, fused_qkv=True, tied=True),
    Architecture("falcon-180b", 14848, 80, 232, 8, 65024, 4 * 14848, gated_mlp=False, fused_qkv=True, tied=True),
]}


def _table_key(model: str) -> str:
    """'meta-llama/Llama-2-7b-hf' -> 'llama-2-7b'; 'tiiuae/falcon-180B' -> 'falcon-180b'."""
    key = model.rstrip("/").split("/")[-1].lower()
    key = re.sub(r"^meta-", "", key)
    key = re.sub(r"(-hf|-instruct|-chat|-v0\.\d|-v\d)+$", "", key)
    return key


def architecture_for(model: str) -> Architecture:
    """A local directory's config.json, else the built-in table (by hub id or short name)."""
    local = Path(model).expanduser()
    if local.exists():
        return from_config_json(local / "config.json" if local.is_dir() else local)
    key = _table_key(model)
    if key in ARCHITECTURES:
        return ARCHITECTURES[key]
    raise ConfigError(f"model {model!r}: not a local model directory and not in the built-in table "
                      f"({', '.join(ARCHITECTURES)}); pass a directory holding its config.json")


def from_config_json(path: Path) -> Architecture:
    try:
        config = json.loads(Path(path).read_text())
        kind = config.get("model_type", "")
        d, heads = config["hidden_size"], config.get("num_attention_heads") or config["n_head"]
        layers = config.get("num_hidden_layers") or config["n_layer"]
        if kind == "falcon":
            if config.get("new_decoder_architecture"):
                kv = config.get("num_kv_heads") or heads
            else:
                kv = 1 if config.get("multi_query", True) else heads
            return Architecture(Path(path).parent.name, d, layers, heads, kv, config["vocab_size"],
                                config.get("ffn_hidden_size") or 4 * d, gated_mlp=False, fused_qkv=True,
                                tied=config.get("tie_word_embeddings", True))
        return Architecture(Path(path).parent.name, d, layers, heads, config.get("num_key_value_heads") or heads,
                            config["vocab_size"], config["intermediate_size"],
                            tied=bool(config.get("tie_word_embeddings", False)))
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found; pass a model directory with config.json") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        what = f"missing field {error}" if isinstance(error, KeyError) else "not a readable model config"
        raise ConfigError(f"{path}: {what}; zerotune plan reads hidden_size, num_hidden_layers, "
                          "num_attention_heads, vocab_size and intermediate_size") from None
