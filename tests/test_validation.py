"""Numbers out of range, wrong adapter/base pairings and misleading data messages: each fails at parse or config
time (or before any weight loads) with one line that names the flag or file and what fits."""

import json
import logging
import math
import shutil
import subprocess
import sys

import pytest

from zerotune.cli import main
from zerotune.config import build_config, field_specs
from zerotune.errors import ConfigError, DataError

NUMERIC_FIELDS = [(key, spec, annotation) for key, spec, annotation in field_specs() if annotation in (int, float)]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    import zerotune.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(zerotune.model, "load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zerotune: error: "), err
    return err


# --- every number of the config schema has a declared range, checked for YAML, flags and overrides alike ---

def test_every_numeric_field_declares_its_range():
    undeclared = [key for key, spec, _ in NUMERIC_FIELDS if spec.metadata.get("valid") is None]
    assert not undeclared, f"numeric config fields without valid=...: {undeclared}"
    for key, spec, _ in NUMERIC_FIELDS:
        assert spec.default in spec.metadata["valid"], key


def outside(interval, annotation_is_int: bool) -> list:
    """Values just outside each finite end of ``interval``."""
    step = 1 if annotation_is_int else 0.5
    values = []
    if math.isfinite(interval.low):
        values.append(interval.low - step if interval.low_closed else interval.low)
    if math.isfinite(interval.high):
        values.append(interval.high + step if interval.high_closed else interval.high)
    return [int(v) if annotation_is_int else v for v in values]


@pytest.mark.parametrize("key, spec, annotation", NUMERIC_FIELDS, ids=[key for key, _, _ in NUMERIC_FIELDS])
def test_values_outside_each_range_are_refused_naming_key_and_flag(key, spec, annotation):
    bad = outside(spec.metadata["valid"], annotation is int)
    if annotation is float:
        bad += [math.nan, math.inf, -math.inf]
    assert bad
    for value in bad:
        with pytest.raises(ConfigError) as caught:
            build_config({key: value})
        message = str(caught.value)
        assert message.startswith(f"{key}: ") and spec.metadata["flag"] in message, message


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "train.lr: must be a finite number more than 0, got nan (flag --lr)"),
    ("--lr", "inf", "train.lr: must be a finite number more than 0, got inf (flag --lr)"),
    ("--epochs", "nan", "train.epochs: must be a finite number 0 or more, got nan (flag --epochs)"),
    ("--lora-dropout", "2", "adapter.dropout: must be in [0, 1), got 2 (flag --lora-dropout)"),
    ("--weight-decay", "-1", "train.weight_decay: must be 0 or more, got -1 (flag --weight-decay)"),
    ("--log-every", "0", "train.log_every: must be at least 1, got 0 (flag --log-every)"),
    ("--lora-alpha", "0", "adapter.alpha: must be at least 1, got 0 (flag --lora-alpha)"),
    ("--warmup-steps", "-5", "train.warmup_steps: must be 0 or more, got -5 (flag --warmup-steps)"),
    ("--max-seq-len", "1", "data.max_seq_len: must be at least 2, got 1 (flag --max-seq-len)"),
    ("--seed", "-1", "train.seed: must be in [0, 4294967295], got -1 (flag --seed)"),
])
def test_train_flags_out_of_range_fail_before_anything_loads(flag, value, message, tiny_llama, alpaca_file, tmp_path,
                                                              capsys, no_model_loading):
    out = tmp_path / "out"
    status = main(["train", "--model", str(tiny_llama), "--data", str(alpaca_file), "--output-dir", str(out),
                   "--max-steps", "1", "--tracking", "none", flag, value])
    assert status == 2
    assert one_line_error(capsys) == f"zerotune: error: {message}"
    assert not out.exists()


def test_yaml_and_overrides_share_the_check(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lr: .nan\n")
    from zerotune.config import load_yaml, parse_overrides

    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number more than 0, got nan \(flag --lr\)"):
        build_config(load_yaml(config))
    with pytest.raises(ConfigError, match=r"adapter\.dropout: must be in \[0, 1\), got 1 \(flag --lora-dropout\)"):
        build_config(parse_overrides(["adapter.dropout=1"]))


def test_empty_target_modules_are_refused():
    with pytest.raises(ConfigError, match="adapter.target_modules: name at least one module"):
        build_config({"adapter.target_modules": ""})


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "m", "--instruction", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens: must be at least 1, got 0"),
    (["generate", "--model", "m", "--instruction", "hi", "--max-new-tokens", "-1"],
     "--max-new-tokens: must be at least 1, got -1"),
    (["generate", "--model", "m", "--instruction", "hi", "--num-beams", "0"], "--num-beams: must be at least 1, got 0"),
    (["generate", "--model", "m", "--instruction", "hi", "--temperature", "nan"],
     "--temperature: must be a finite number 0 or more, got nan"),
    (["generate", "--model", "m", "--instruction", "hi", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    (["generate", "--model", "m", "--instruction", "hi", "--max-new-tokens", "ten"],
     "--max-new-tokens: expected an integer, got 'ten'"),
    (["plan", "--model", "llama-2-7b", "--nodes", "0"], "--nodes: must be at least 1, got 0"),
    (["plan", "--model", "llama-2-7b", "--dataset-tokens", "nan"],
     "--dataset-tokens: must be a finite number at least 1, got nan"),
    (["plan", "--model", "llama-2-7b", "--internode-gbps", "0"], "--internode-gbps: must be more than 0, got 0"),
    (["plan", "--model", "llama-2-7b", "--price-per-gpu-hour", "inf"],
     "--price-per-gpu-hour: must be a finite number 0 or more, got inf"),
    (["plan", "--model", "llama-2-7b", "--lr", "0"], "train.lr: must be more than 0, got 0 (flag --lr)"),
    (["bench", "w1", "--tiny", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["bench", "w1", "--tiny", "--warmup-steps", "-1"], "--warmup-steps: must be 0 or more, got -1"),
    (["bench", "w1", "--tiny", "--seed", "-3"], "--seed: must be in [0, 4294967295], got -3"),
    (["quickstart", "--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
])
def test_other_commands_check_their_numbers_at_parse_time(argv, message, capsys, no_model_loading):
    assert main(argv) == 2
    assert one_line_error(capsys) == f"zerotune: error: {message}"


def test_generate_device_cuda_without_a_gpu(tiny_llama, capsys, monkeypatch, no_model_loading):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", str(tiny_llama), "--instruction", "hi", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is visible" in one_line_error(capsys)


def test_generate_chat_template_without_one(tiny_llama, tmp_path, capsys, no_model_loading):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink()
    assert main(["generate", "--model", str(plain), "--instruction", "hi", "--template", "chat"]) == 2
    err = one_line_error(capsys)
    assert "--template chat: the tokenizer of" in err and "has no chat template" in err and "--template alpaca" in err


# --- an adapter and the base it is used with ---

@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    """A tiny Falcon (other module names) and a tiny Llama twice as wide (same names, other sizes)."""
    from conftest import corpus
    from zerotune.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("other_bases")
    falcon = save_tiny_model(root / "falcon", corpus(), "falcon", vocab_size=300, hidden_size=32, layers=2, heads=4)
    wide = save_tiny_model(root / "wide_llama", corpus(), "llama", vocab_size=300, hidden_size=64, layers=2, heads=4,
                           kv_heads=2)
    return {"falcon": falcon, "wide": wide}


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter on every linear layer of tiny_llama, written as training writes it (zerotune.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("adapters") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(directory)
    (directory / "zerotune.json").write_text(json.dumps({"base_model": str(tiny_llama), "template": "alpaca"}))
    return directory


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_adapter_on_another_architecture_names_the_right_base(command, llama_adapter, other_bases, tiny_llama,
                                                              tmp_path, capsys, no_model_loading):
    falcon = other_bases["falcon"]
    extra = (["--instruction", "hi"] if command == "generate" else ["--output-dir", str(tmp_path / "merged")])
    assert main([command, "--model", str(falcon), "--adapter", str(llama_adapter), *extra]) == 2
    err = one_line_error(capsys)
    assert f"adapter {llama_adapter} was trained on {tiny_llama}; --model {falcon} does not have its modules (" in err
    assert "q_proj" in err and "14 of 14 missing" in err and err.endswith(f"pass --model {tiny_llama}")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_adapter_on_another_size_names_the_module_and_sizes(command, llama_adapter, other_bases, tiny_llama, tmp_path,
                                                            capsys, no_model_loading):
    wide = other_bases["wide"]
    extra = (["--instruction", "hi"] if command == "generate" else ["--output-dir", str(tmp_path / "merged")])
    assert main([command, "--model", str(wide), "--adapter", str(llama_adapter), *extra]) == 2
    err = one_line_error(capsys)
    assert f"--model {wide} has its modules in other sizes (model.layers.0.mlp.down_proj: 192 -> 64 features, " \
           f"the adapter's 96 -> 32)" in err and err.endswith(f"pass --model {tiny_llama}")


def test_adapter_without_zerotune_json_falls_back_to_peft_record(llama_adapter, other_bases, tmp_path, capsys,
                                                                 no_model_loading):
    bare = tmp_path / "bare_adapter"
    shutil.copytree(llama_adapter, bare)
    (bare / "zerotune.json").unlink()
    recorded = json.loads((bare / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["generate", "--model", str(other_bases["falcon"]), "--adapter", str(bare), "--instruction", "hi"]) == 2
    assert f"was trained on {recorded};" in one_line_error(capsys)


def test_a_copy_of_the_base_elsewhere_fits(llama_adapter, tiny_llama, tmp_path, capsys):
    """The recorded name is a hint, the modules are the test: a local copy of the same model generates."""
    copy = tmp_path / "copy_of_llama"
    shutil.copytree(tiny_llama, copy)
    assert main(["generate", "--model", str(copy), "--adapter", str(llama_adapter), "--instruction", "hi",
                 "--max-new-tokens", "2"]) == 0


# --- data messages ---

def test_missing_eval_file_names_eval_data(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    status = main(["train", "--model", str(tiny_llama), "--data", str(alpaca_file), "--eval-data",
                   str(tmp_path / "eval.jsonl"), "--output-dir", str(tmp_path / "out"), "--tracking", "none"])
    assert status == 2
    assert one_line_error(capsys).endswith("eval.jsonl: data file not found; check the path given to --eval-data")


def test_all_dropped_under_truncate_says_what_helps(tiny_llama, alpaca_file):
    """Under truncate (the default) the prompts fill the window: the message names the smallest --max-seq-len that
    keeps an example, and that length does keep one while one less keeps none."""
    from zerotune.data.encode import encode_records
    from zerotune.data.records import read_records
    from zerotune.config import ModelConfig
    from zerotune.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_llama)))
    records, where = read_records(str(alpaca_file))
    with pytest.raises(DataError) as caught:
        encode_records(tokenizer, records, where, "auto", 8, "truncate")
    message = str(caught.value)
    assert "have prompts that fill data.max_seq_len=8 tokens" in message and "--overlong" not in message
    needed = int(message.split("to at least ")[1].split(" ")[0])
    examples, _ = encode_records(tokenizer, records, where, "auto", needed, "truncate")
    assert len(examples) >= 1
    with pytest.raises(DataError):
        encode_records(tokenizer, records, where, "auto", needed - 1, "truncate")


def test_all_dropped_under_drop_suggests_truncate(tiny_llama, alpaca_file):
    from zerotune.data.encode import encode_records
    from zerotune.data.records import read_records
    from zerotune.config import ModelConfig
    from zerotune.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_llama)))
    records, where = read_records(str(alpaca_file))
    with pytest.raises(DataError) as caught:
        encode_records(tokenizer, records, where, "auto", 8, "drop")
    message = str(caught.value)
    assert "longer than data.max_seq_len=8 tokens" in message and "--overlong truncate" in message
    needed = int(message.split("to at least ")[1].split(" ")[0])
    assert needed == min(len(e.input_ids) for e in encode_records(tokenizer, records, where, "auto", 10**6, "drop")[0])


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_byte_order_mark_is_not_part_of_record_one(suffix, tmp_path):
    from zerotune.data.records import read_records

    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    text = "".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records)
    path = tmp_path / f"bom{suffix}"
    path.write_text(text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_records(str(path))[0] == records


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    from zerotune.generate import read_prompt_file

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"instruction": "hola"}) + "\n", encoding="utf-8-sig")
    assert read_prompt_file(str(path)) == [{"instruction": "hola"}]


def test_saved_dataset_directory_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    from zerotune.data.records import read_records

    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e",
                                                                                         "output": "f"}]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "single"))
    assert read_records(str(tmp_path / "single"))[0] == records
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:2]),
                                   "test": datasets.Dataset.from_list(records[2:])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert read_records(str(tmp_path / "splits"))[0] == records[:2]
    assert read_records(str(tmp_path / "splits"), split="test")[0] == records[2:]
    with pytest.raises(DataError, match=r"splits: no split 'validation' in this saved dataset \(it has train, test\)"):
        read_records(str(tmp_path / "splits"), split="validation")


def test_plain_directory_is_not_a_data_file(tmp_path):
    from zerotune.data.records import read_records

    (tmp_path / "somewhere").mkdir()
    with pytest.raises(DataError, match="somewhere: a directory with no .json, .jsonl, .parquet, .csv or .tsv "
                                        "files; give --data a data file"):
        read_records(str(tmp_path / "somewhere"))


# --- a harmless library warning, silenced by logger and text only ---

def test_bitsandbytes_kernel_lookup_warning_is_dropped_and_others_stay():
    import zerotune  # noqa: F401  (installs the filters)

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "offline")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes warning"]


def test_importing_bitsandbytes_after_zerotune_is_quiet():
    pytest.importorskip("bitsandbytes")
    result = subprocess.run([sys.executable, "-c", "import zerotune, peft, bitsandbytes"], capture_output=True,
                            text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "quantization-bitsandbytes" not in result.stderr
