"""Shared fixtures: tiny models built locally (no hub), small data files, a config builder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data cache of a test session lives and dies with it (never the user's ~/.cache).
os.environ.setdefault("ZEROTUNE_DATA_CACHE", tempfile.mkdtemp(prefix="zerotune-data-cache-"))

from zerotune.config import build_config  # noqa: E402
from zerotune.quickstart import resource, tokenizer_corpus  # noqa: E402
from zerotune.tiny import save_tiny_model  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def corpus() -> list[str]:
    return tokenizer_corpus(read_jsonl(resource("quickstart_train.jsonl")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama", corpus(), "llama", vocab_size=300,
                           hidden_size=32, layers=2, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_pad_eos(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama_pad_eos", corpus(), "llama",
                           vocab_size=300, hidden_size=32, layers=2, heads=4, pad_is_eos=True, seed=0)


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    """48 English and Spanish records of varied lengths (the quickstart's training data)."""
    records = read_jsonl(resource("quickstart_train.jsonl"))[:48]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def preference_pairs(records: list[dict]) -> list[dict]:
    """Pairs from SFT records: the record's output is chosen; the rejected answer runs on past it."""
    return [{"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"] + ", 99, 100", "lang": r["lang"]}
            for r in records]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """48 preference pairs (prompt, chosen, rejected) in English and Spanish, from the quickstart's records."""
    records = preference_pairs(read_jsonl(resource("quickstart_train.jsonl"))[:48])
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", records)


def make_config(model: Path, data: Path, output: Path, **overrides):
    layers = {
        "model.name": str(model), "model.dtype": "fp32", "data.path": str(data), "data.eval_fraction": 0.0,
        "data.max_seq_len": 128, "train.max_steps": 3, "train.batch_size": 4, "train.lr": 1e-2,
        "train.seed": 0, "train.warmup_steps": 0, "adapter.dropout": 0.0, "tracking.backend": "none",
        "output.dir": str(output),
    }
    layers.update(overrides)
    return build_config(layers)


@pytest.fixture
def config_for(tiny_llama, alpaca_file, tmp_path):
    def factory(**overrides):
        return make_config(tiny_llama, alpaca_file, tmp_path / "run", **overrides)

    return factory


def assert_state_close(left: dict, right: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA; on CPU machines (CI) they are skipped, and say so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
