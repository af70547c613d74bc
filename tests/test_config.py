import pytest

from zerotune.cli import build_parser, config_from_args, parse_args
from zerotune.config import build_config, dump_yaml, config_from_dict, load_yaml
from zerotune.errors import ConfigError
import yaml


def parse(argv):
    return config_from_args(parse_args(["train", *argv]))


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: 7\n  grad_accum: 3\nmodel:\n  name: from-yaml\n")
    config = parse([str(path), "--lr", "0.2", "--model", "from-flag", "train.lr=0.3"])
    assert config.train.lr == 0.3  # override beats flag beats yaml
    assert config.model.name == "from-flag"
    assert config.train.batch_size == 7  # yaml beats default
    assert config.train.grad_accum == 3
    assert config.train.max_steps == 0  # default


def test_tutorial_flags_parse():
    config = parse(["--num-workers", "4", "--use-cpu", "--no-deepspeed", "--model", "tiiuae/falcon-7b"])
    assert (config.distributed.num_workers, config.distributed.use_cpu, config.distributed.no_deepspeed) == (4, True, True)
    assert config.model.name == "tiiuae/falcon-7b"


def test_list_flag_and_bool_override():
    config = parse(["--lora-target-modules", "q_proj,v_proj", "model.gradient_checkpointing=true"])
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.model.gradient_checkpointing is True


@pytest.mark.parametrize("layer, message", [
    ({"train.learning_rate": 1}, "unknown config key 'train.learning_rate'"),
    ({"trainer.lr": 1}, "unknown config key 'trainer.lr'"),
    ({"train.batch_size": "four"}, "train.batch_size: expected an integer"),
    ({"train.lr": "fast"}, "train.lr: expected a number"),
    ({"model.dtype": "int3"}, "model.dtype: 'int3' is not one of"),
    ({"distributed.zero_stage": 4}, "distributed.zero_stage: ZeRO has stages 1, 2 and 3"),
    ({"train.batch_size": 0}, "train.batch_size: must be at least 1"),
])
def test_bad_values_name_the_key(layer, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(layer)


def test_unknown_yaml_section_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config section 'optimizer'"):
        load_yaml(path)


def test_resolved_config_round_trips():
    config = build_config({"train.lr": 5e-5, "adapter.target_modules": ["q_proj"]})
    again = config_from_dict(yaml.safe_load(dump_yaml(config)))
    assert again == config


def test_help_lists_every_flag(capsys):
    from zerotune.config import field_specs

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key, spec, _ in field_specs():
        if spec.metadata["flag"]:
            assert spec.metadata["flag"] in text, key


def test_compile_auto_rule_and_yaml_on_off(tmp_path):
    """model.compile: auto compiles on CUDA except under DeepSpeed ZeRO-3, where on is refused; YAML's bare
    on/off (read as booleans) and the flag's values all land on the same three settings."""
    from zerotune.resolve import explain_compile

    def compile_enabled(model, device_type, zero3=False):
        return explain_compile(model.compile, device_type, zero3)[0]

    auto = parse([]).model
    assert auto.compile == "auto"
    assert compile_enabled(auto, "cuda") and not compile_enabled(auto, "cuda", zero3=True)
    assert not compile_enabled(auto, "cpu")
    assert not compile_enabled(parse(["--compile", "off"]).model, "cuda", zero3=True)
    with pytest.raises(ConfigError, match="model.compile: on does not work under DeepSpeed ZeRO-3"):
        compile_enabled(parse(["--compile", "on"]).model, "cuda", zero3=True)
    assert compile_enabled(parse(["--compile", "on"]).model, "cpu")
    assert not compile_enabled(parse(["--compile", "off"]).model, "cuda")
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  compile: off\n")  # YAML 1.1 reads this as False
    assert parse([str(path)]).model.compile == "off"
    path.write_text("model:\n  compile: on\n")
    assert parse([str(path)]).model.compile == "on"
    with pytest.raises(ConfigError, match="model.compile"):
        build_config({"model.compile": "sometimes"})


def sentences(text: str) -> int:
    """Sentence-ending marks: '.', '!' or '?' followed by a space or the end, e.g./i.e. not counted."""
    import re

    return len(re.findall(r"[.!?](?:\s|$)", text.replace("e.g.", "eg").replace("i.e.", "ie")))


def every_help() -> list[tuple[str, str]]:
    """(where, help) for every config field, and every argparse help of every subcommand and the command list.
    Flags generated from the config end in ' [key; default: ...]', which is the field's help plus the key."""
    import argparse

    from zerotune.config import field_specs

    helps = [(key, spec.metadata["help"]) for key, spec, _ in field_specs()]
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps += [(f"zerotune {choice.dest}", choice.help) for choice in commands._choices_actions]
    for name, subparser in commands.choices.items():
        for action in subparser._actions:
            if action.help and action.help != argparse.SUPPRESS and "." not in action.dest and action.dest != "help":
                helps.append((f"zerotune {name} {'/'.join(action.option_strings) or action.dest}", action.help))
    return helps


def test_every_help_is_one_sentence_of_at_most_160_characters():
    helps = every_help()
    assert len(helps) > 80 and any(where == "adapter.fused_projections" for where, _ in helps)
    assert any(where == "zerotune bench --steps" for where, _ in helps)
    too_long = [f"{where}: {len(text)} characters" for where, text in helps if len(text) > 160]
    several = [f"{where}: {text!r}" for where, text in helps if sentences(text) > 1]
    assert not too_long and not several, "\n".join(too_long + several)


def test_sentences_counts_sentence_ends_only():
    assert sentences("Weight dtype; auto: bf16 on GPUs, fp32 on CPU.") == 1
    assert sentences("MLflow URI, e.g. http://127.0.0.1:5000; empty: sqlite:///mlflow.db here") == 0
    assert sentences("Weight dtype. auto: bf16 on GPUs.") == 2
