"""Each bad input: one-line error naming the file/line/field, exit status 2, nothing loaded or overwritten."""

import json

import pytest

from zerotune.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    import zerotune.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(zerotune.model, "load_model", refuse)  # what every strategy's load_base_model calls
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def run_cli(capsys, *argv):
    status = main(["train", "--tracking", "none", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return status, err


def base_args(tiny_llama, data, out):
    return ["--model", tiny_llama, "--data", data, "--output-dir", out, "--max-steps", "1", "--batch-size", "1"]


CASES = {
    "missing_file": (None, r"missing\.jsonl: data file not found"),
    "malformed_line": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n',
                       r"bad\.jsonl line 2: malformed JSON"),
    "missing_output": ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
                       r'bad\.jsonl line 2: missing field "output"'),
    "missing_instruction": ('{"output": "b"}\n', r'bad\.jsonl line 1: missing field "instruction"'),
    "empty_dataset": ("\n", r"bad\.jsonl: the dataset is empty"),
    "tokens_not_ints": ('{"input_ids": [5, 6, 7]}\n{"input_ids": "5 6 7"}\n',
                        r'bad\.jsonl line 2: field "input_ids" must be a non-empty list of token ids'),
    "tokens_labels_length": ('{"input_ids": [5, 6, 7], "labels": [5, 6]}\n',
                             r'bad\.jsonl line 1: field "labels" must be a list of integers as long as "input_ids"'),
    "tokens_nothing_to_learn": ('{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}\n',
                                r"bad\.jsonl line 1: every label is -100"),
    "output_is_a_number": ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 42}\n',
                           r'bad\.jsonl line 2: field "output" has the wrong type: expected a string, got int 42'),
    "instruction_is_a_list": ('{"instruction": ["a"], "output": "b"}\n',
                              r'bad\.jsonl line 1: field "instruction" has the wrong type: expected a string'),
    # a byte-order mark before record 1 is read as such (utf-8-sig): the first error is the real one, on line 2
    "byte_order_mark": ('\ufeff{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
                        r'bad\.jsonl line 2: missing field "output"'),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data(case, tiny_llama, tmp_path, capsys, no_model_loading):
    content, pattern = CASES[case]
    data = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        data.write_text(content)
    status, err = run_cli(capsys, *base_args(tiny_llama, data, tmp_path / "out"))
    assert status == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("zerotune: error: ")
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_all_examples_too_long(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"),
                          "--max-seq-len", "8", "--overlong", "drop")
    assert status == 2 and "longer than data.max_seq_len=8" in err and "--max-seq-len" in err
    assert "--overlong truncate" in err  # under drop, truncating is what keeps them


def test_all_examples_too_long_under_truncate(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    """truncate is the default: suggesting it would not help; a longer window or shorter prompts do."""
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--max-seq-len", "8")
    assert status == 2 and len(err.splitlines()) == 1
    assert "have prompts that fill data.max_seq_len=8 tokens" in err and "raise --max-seq-len (to at least " in err
    assert "--overlong" not in err


def test_unknown_template(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "data.template=vicuna")
    assert status == 2 and "data.template: 'vicuna' is not one of" in err


def test_unknown_config_key(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  learning_rate: 0.1\n")
    status, err = run_cli(capsys, config, *base_args(tiny_llama, alpaca_file, tmp_path / "out"))
    assert status == 2 and "unknown config key 'train.learning_rate'" in err and "lr" in err


def test_unreachable_model(alpaca_file, tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, err = run_cli(capsys, *base_args("nobody/no-such-model-xyz", alpaca_file, tmp_path / "out"))
    assert status == 2 and "'nobody/no-such-model-xyz'" in err and "local model directory" in err


def test_existing_output_dir_is_kept(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, out))
    assert status == 2 and "holds files zerotune did not create" in err and "pass --overwrite" not in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_not_enough_examples_for_one_batch(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out")[:-2],
                          "--batch-size", "64", "--eval-fraction", "0")
    assert status == 2 and "fewer than one global batch" in err


def test_chat_record_without_messages(tiny_llama, tmp_path, capsys, no_model_loading):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    status, err = run_cli(capsys, *base_args(tiny_llama, data, tmp_path / "out"), "--template", "chat")
    assert status == 2 and "chat.jsonl line 1: messages[0] needs role and content" in err


def test_too_many_workers(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    import os

    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--num-workers", str((os.cpu_count() or 1) + 1))
    assert status == 2 and "distributed.num_workers" in err and "CPU cores on this machine" in err


@pytest.mark.parametrize("content, pattern", [
    ("{not json", r"ds\.json line 1: not valid JSON"),
    ('{"zero_optimisation": {"stage": 3}}', r"ds\.json: unknown DeepSpeed key 'zero_optimisation'"),
    ('{"zero_optimization": {"stage": 4}}', r"ds\.json: zero_optimization\.stage 4 does not exist"),
    ('{"bf16": {"enabled": true}}', r"ds\.json: bf16\.enabled is true, but this run is on CPU"),
])
def test_bad_deepspeed_json(content, pattern, tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    pytest.importorskip("deepspeed")
    import re

    ds = tmp_path / "ds.json"
    ds.write_text(content)
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--deepspeed", ds)
    assert status == 2 and re.search(pattern, err), err


@pytest.mark.parametrize("engine", [["--strategy", "deepspeed", "--zero-stage", "2"], ["--deepspeed", "ds.json"]])
def test_sharded_loading_needs_zero3(engine, tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    pytest.importorskip("deepspeed")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    engine = [str(tmp_path / e) if e == "ds.json" else e for e in engine]
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--num-workers", "2", "--sharded-loading", *engine)
    assert status == 2 and "sharded_loading under DeepSpeed needs ZeRO stage 3" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", [["--strategy", "deepspeed"], ["--deepspeed", "ds.json"]])
def test_compile_on_is_refused_under_zero3(engine, tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    """ZeRO-3's per-module hooks inside compiled layers recompile past torch.compile's limit: --compile on under
    stage 3 (the default stage, or a JSON's "auto" stage) stops before any worker starts."""
    pytest.importorskip("deepspeed")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": "auto"}}')
    engine = [str(tmp_path / e) if e == "ds.json" else e for e in engine]
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--compile", "on", *engine)
    assert status == 2 and "model.compile: on does not work under DeepSpeed ZeRO-3" in err, err
    assert "--zero-stage 2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_json_with_stage_auto_counts_as_the_configured_stage(tiny_llama, tmp_path):
    """"stage": "auto" is filled from distributed.zero_stage (3 by default): --sharded-loading passes the ZeRO-3
    check, and --zero-stage 2 makes it fail."""
    pytest.importorskip("deepspeed")
    from zerotune.config import config_from_dict
    from zerotune.errors import ConfigError
    from zerotune.preflight import check_workers

    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": "auto"}}')
    tree = {"model": {"name": str(tiny_llama)}, "distributed": {"deepspeed_config": str(ds), "use_cpu": True,
                                                                "num_workers": 2, "sharded_loading": True}}
    check_workers(config_from_dict(tree))
    tree["distributed"]["zero_stage"] = 2
    with pytest.raises(ConfigError, match="gives stage 2"):
        check_workers(config_from_dict(tree))


def test_missing_deepspeed_json(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    pytest.importorskip("deepspeed")
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--deepspeed",
                          tmp_path / "nope.json")
    assert status == 2 and "nope.json: DeepSpeed config not found" in err


def test_fp16_cannot_train_on_cpu(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading):
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--dtype", "fp16")
    assert status == 2 and "model.dtype fp16 cannot train on CPU" in err


def test_qlora_on_cpu_without_a_cpu_backend_suggests_lora(tiny_llama, alpaca_file, tmp_path, capsys,
                                                          no_model_loading, monkeypatch):
    """A bitsandbytes that cannot run 4-bit on the CPU (before 0.50): one line naming --method lora, before
    anything loads. (With 0.50 QLoRA trains on CPU: tests/test_models.py.)"""
    import zerotune.model

    monkeypatch.setattr(zerotune.model, "bitsandbytes_runs_4bit_on_cpu", lambda: False)
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--use-cpu",
                          "--method", "qlora")
    assert status == 2 and len(err.splitlines()) == 1
    assert "cannot run 4-bit on the CPU" in err and "--method lora" in err
    assert not (tmp_path / "out").exists()


def test_qlora_without_bitsandbytes_says_how_to_install(tiny_llama, alpaca_file, tmp_path, capsys, no_model_loading,
                                                        monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    status, err = run_cli(capsys, *base_args(tiny_llama, alpaca_file, tmp_path / "out"), "--method", "qlora")
    assert status == 2 and len(err.splitlines()) == 1
    assert "pip install 'zerotune[qlora]'" in err and "--method lora" in err


def test_generate_refuses_the_tokens_template(tiny_llama, capsys):
    assert main(["generate", "--model", str(tiny_llama), "--instruction", "hi", "--template", "tokens"]) == 2
    assert "no prompt format" in capsys.readouterr().err
