"""zerotune.resolve: every "auto" decided once, in the launching process, with its reason; the table is logged,
saved as resolved.yaml (config.yaml stays the user's), printed by `train --dry-run` and `plan`, and the
workers run with it."""

import json
import subprocess
import sys

import pytest
import yaml

from zerotune.config import build_config, config_from_dict
from zerotune.errors import ConfigError
from zerotune.resolve import Machine, Settings, resolve

H100 = Machine("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, 1, bf16=True)


def decided(settings: Settings) -> dict:
    return {d.key: d.decided for d in settings.decisions}


def test_on_a_cpu_every_auto_resolves_to_its_cpu_value():
    settings = resolve(build_config({}), Machine("cpu"))
    assert (settings.launcher, settings.device_type, settings.strategy, settings.dtype, settings.attention) == \
        ("inprocess", "cpu", "single", "fp32", "sdpa")
    assert not (settings.compile or settings.fused_projections or settings.cuda_graph or settings.compiled_nf4)
    rows = decided(settings)
    assert rows["model.compile"] == "off" and rows["train.cuda_graph"] == "off"
    assert all(d.why for d in settings.decisions)  # every decision says why
    assert Settings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_on_one_gpu_lora_gets_the_measured_fast_path_and_asks_the_data_only_when_it_must():
    asked = []

    def fixed_shapes():
        asked.append(1)
        return True

    settings = resolve(build_config({}), H100, fixed_shapes=fixed_shapes)
    assert (settings.dtype, settings.compile, settings.fused_projections, settings.cuda_graph) == \
        ("bf16", True, True, True)
    assert asked == [1]
    packed = resolve(build_config({"data.packing": True}), H100, fixed_shapes=lambda: pytest.fail("asked"))
    assert packed.cuda_graph
    varying = resolve(build_config({}), H100, fixed_shapes=lambda: False)
    assert not varying.cuda_graph
    row = [d for d in varying.decisions if d.key == "train.cuda_graph"][0]
    assert (row.asked, row.decided) == ("auto", "off") and "--packing fixes the shape" in row.why
    unknown = resolve(build_config({}), H100)  # a plan without data: off, and it says what it would need
    assert not unknown.cuda_graph


def test_qlora_on_one_gpu_compiles_its_matmul_but_not_under_ddp():
    one = resolve(build_config({"adapter.method": "qlora"}), H100)
    assert one.compiled_nf4 and not one.fused_projections
    two = resolve(build_config({"adapter.method": "qlora", "distributed.num_workers": 2,
                                "distributed.strategy": "ddp"}), Machine("cuda", "NVIDIA H100", 80 * 2**30, 2, True))
    assert not two.compiled_nf4 and not two.cuda_graph
    assert "one process only" in [d.why for d in two.decisions if d.key == "model.compiled_nf4"][0]


def test_zero3_from_a_json_turns_compile_off_and_its_leaf_modules_rule(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "leaf_module": {"names": ["X"]}}}))
    config = build_config({"distributed.deepspeed_config": str(ds), "distributed.num_workers": 2})
    settings = resolve(config, Machine("cuda", "NVIDIA H100", 80 * 2**30, 2, True))
    rows = decided(settings)
    assert (settings.strategy, settings.zero_stage, settings.compile) == ("deepspeed", 3, False)
    assert rows["distributed.zero3_fetch"] == "json" and rows["model.mixed_precision"] == "engine"
    with pytest.raises(ConfigError, match="model.compile: on does not work under DeepSpeed ZeRO-3"):
        resolve(build_config({"distributed.deepspeed_config": str(ds), "model.compile": "on"}), Machine("cpu"))


def test_on_settings_that_cannot_run_fail_before_anything_loads():
    with pytest.raises(ConfigError, match=r"train.cuda_graph: needs one worker on a CUDA GPU"):
        resolve(build_config({"train.cuda_graph": "on"}), Machine("cpu"))
    with pytest.raises(ConfigError, match=r"train.cuda_graph: needs --attn-implementation sdpa"):
        resolve(build_config({"train.cuda_graph": "on", "model.attn_implementation": "eager"}), H100)


def test_a_run_saves_the_table_beside_the_users_config(config_for, tmp_path, capsys):
    from helpers import train

    config = config_for(**{"train.max_steps": 1})
    train(config)
    output = tmp_path / "run"
    saved = yaml.safe_load((output / "resolved.yaml").read_text())
    assert Settings.from_dict(saved).strategy == "single"
    user = config_from_dict(yaml.safe_load((output / "config.yaml").read_text()))
    assert user.model.compile == "auto" and user.distributed.strategy == "auto"  # the user's, for --resume
    assert "settings as resolved (resolved.yaml):" in capsys.readouterr().out


@pytest.mark.slow
def test_train_dry_run_prints_the_table_and_writes_nothing(tiny_llama, alpaca_file, tmp_path):
    output = tmp_path / "never"
    result = subprocess.run([sys.executable, "-m", "zerotune", "train", "--model", str(tiny_llama), "--data",
                             str(alpaca_file), "--output-dir", str(output), "--dry-run"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "distributed.strategy" in result.stdout and "single: one worker" in result.stdout
    assert "dry run" in result.stdout and not output.exists()


def test_plan_prints_what_train_would_decide_on_the_planned_gpus(capsys):
    from zerotune.cli import main

    assert main(["plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpu", "h100", "--gpus", "1", "--json"]) in (0, None)
    plan = json.loads(capsys.readouterr().out)
    rows = {row["key"]: row for row in plan["settings"]}
    assert rows["distributed.strategy"]["decided"] == "single" and rows["model.dtype"]["decided"] == "bf16"
    assert rows["model.compile"]["decided"] == "on"
