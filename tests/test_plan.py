"""`zerotune plan`: its predictions against every GPU measurement stored in benchmarks/results, the tutorial's
Falcon-180B scenario, lints, --strategy auto, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from zerotune.cli import main
from zerotune.config import build_config
from zerotune.plan.catalog import ARCHITECTURES, GPUS, from_config_json, gpu_from_device_name
from zerotune.plan.estimate import Scenario, estimate
from zerotune.plan.report import auto_engine, make_plan

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
L7, L3 = ARCHITECTURES["llama-2-7b"], ARCHITECTURES["llama-3-8b"]
OLD = dict(chunked_loss=False, mixed_precision=False)  # the code before those existed = today's with them off
CKPT4 = dict(micro_batch=4, checkpointing=True)


def _bench(name):
    def read(path):
        r = json.loads(path.read_text())
        return r["gpu"], r["ours"]["tokens_per_second_per_gpu"], r["ours"]["peak_gib"]
    return name, read


def _engine_run(name, engine):
    def read(path):
        r = json.loads(path.read_text())
        run = next(run for run in r["runs"] if run["engine"] == engine)
        return r["gpu"], run["tokens_per_second_per_gpu"], run["peak_gib_rank0"]
    return name, read


def _full(name):
    def read(path):
        r = json.loads(path.read_text())
        return r["gpu"], r["tokens_per_second"], r["peak_gib"]
    return name, read


# (file, reader, scenario, fitted): "fitted" measurements set a calibration constant (plan/calibration.py);
# the others are predictions the constants were not fitted to.
MEASURED = [
    (*_bench("2026-11-28-h200-w1.json"), dict(arch=L7, compile=True), True),
    (*_bench("2026-11-28-h200-w1-repeat.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-ckpt.json"), dict(arch=L7, compile=True, **CKPT4), True),
    (*_bench("2026-11-28-h200-w2.json"), dict(arch=L3, compile=True), False),
    (*_bench("2026-11-28-h200-qlora.json"), dict(arch=L7, compile=True, checkpointing=True, method="qlora"), True),
    # session 4 (commit 4234758: host-side label count, no mid-forward sync), out of sample
    (*_bench("2026-11-28-h200-w1-at-4234758.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-ckpt-at-4234758.json"), dict(arch=L7, compile=True, **CKPT4), False),
    (*_bench("2026-11-28-h200-w2-at-4234758.json"), dict(arch=L3, compile=True), False),
    (*_bench("2026-11-28-h200-qlora-at-4234758.json"),
     dict(arch=L7, compile=True, checkpointing=True, method="qlora"), False),
    (*_bench("2026-11-28-h200-qlora-mb4-at-4234758.json"), dict(arch=L7, compile=True, method="qlora", **CKPT4),
     False),
    (*_bench("2026-11-28-h200-qlora-at-e944061.json"),
     dict(arch=L7, compile=True, checkpointing=True, method="qlora"), False),
    # session 5 (commit 9406323: the loop reads each step back one step late), out of sample
    (*_bench("2026-11-28-h200-w1-at-9406323.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-ckpt-at-9406323.json"), dict(arch=L7, compile=True, **CKPT4), False),
    (*_bench("2026-11-28-h200-w2-at-9406323.json"), dict(arch=L3, compile=True), False),
    (*_bench("2026-11-28-h200-qlora-at-9406323.json"),
     dict(arch=L7, compile=True, checkpointing=True, method="qlora"), False),
    (*_bench("2026-11-28-h200-qlora-mb4-at-9406323.json"), dict(arch=L7, compile=True, method="qlora", **CKPT4),
     False),
    # commits 22db377 and 6ccd5f2 (step time from CUDA events), on other H200 hosts than 9406323's
    (*_bench("2026-11-28-h200-w1-at-22db377.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-at-22db377-repeat.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-ckpt-at-22db377.json"), dict(arch=L7, compile=True, **CKPT4), False),
    (*_bench("2026-11-28-h200-qlora-at-22db377.json"),
     dict(arch=L7, compile=True, checkpointing=True, method="qlora"), False),
    (*_bench("2026-11-28-h200-w1-at-6ccd5f2.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w1-at-6ccd5f2-repeat.json"), dict(arch=L7, compile=True), False),
    (*_bench("2026-11-28-h200-w2-at-6ccd5f2.json"), dict(arch=L3, compile=True), False),
    (*_bench("2026-11-28-h200x2-w4-at-cf77474.json"),
     dict(arch=L7, compile=True, gpus_per_node=2, strategy="ddp", **CKPT4), False),
    (*_bench("2026-11-28-h200x2-w4-at-4234758.json"),
     dict(arch=L7, compile=True, gpus_per_node=2, strategy="ddp", **CKPT4), False),
    (*_bench("2026-11-28-h200-w1-before-autocast.json"), dict(arch=L7, compile=True, mixed_precision=False), True),
    (*_bench("2026-11-28-h200-w2-no-chunked-loss.json"), dict(arch=L3, compile=True, chunked_loss=False), False),
    (*_bench("2026-11-28-h200x2-w4.json"),
     dict(arch=L7, compile=True, mixed_precision=False, gpus_per_node=2, strategy="ddp", **CKPT4), False),
    (*_bench("2026-11-28-h200x2-w4-fsdp.json"),
     dict(arch=L7, compile=True, mixed_precision=False, gpus_per_node=2, strategy="fsdp", **CKPT4), True),
    (*_engine_run("2026-11-28-h200x2-engines-verification.json", "single"), dict(arch=L7, **OLD, **CKPT4), True),
    (*_engine_run("2026-11-28-h200x2-engines-verification.json", "ddp"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="ddp"), True),
    (*_engine_run("2026-11-28-h200x2-engines-verification.json", "fsdp"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="fsdp"), True),
    (*_engine_run("2026-11-28-h200x2-engines-verification.json", "zero3"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", zero3_fetch="module"), True),
    (*_engine_run("2026-11-28-h200x2-zero-variants.json", "zero3"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", zero3_fetch="module"), False),
    (*_engine_run("2026-11-28-h200x2-zero3-layer-fetch.json", "zero3"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed"), True),
    (*_engine_run("2026-11-28-h200x2-zero3-layer-fetch.json", "zero3_module"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", zero3_fetch="module"), False),
    (*_engine_run("2026-11-28-h200x2-zero-variants.json", "zero2"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", zero_stage=2), True),
    (*_engine_run("2026-11-28-h200x2-engines-verification.json", "tutorial_json"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", offload="all", zero3_fetch="module"), True),
    (*_engine_run("2026-11-28-h200x2-tutorial-json-layer-fetch.json", "tutorial_json"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", offload="all"), True),
    (*_engine_run("2026-11-28-h200x2-tutorial-json-layer-fetch.json", "tutorial_json_module"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=2, strategy="deepspeed", offload="all", zero3_fetch="module"), False),
    (*_engine_run("2026-11-28-h100x4-weak-scaling.json", "single"), dict(arch=L7, **OLD, **CKPT4), False),
    (*_engine_run("2026-11-28-h100x4-weak-scaling.json", "ddp4"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=4, strategy="ddp"), False),
    (*_engine_run("2026-11-28-h100x4-weak-scaling.json", "fsdp4"),
     dict(arch=L7, **OLD, **CKPT4, gpus_per_node=4, strategy="fsdp"), False),
    # session 21: DeepSpeed ZeRO-1/2 on one H200, compiled layers (auto since 1a9817c) and eager, out of sample
    # but for the W1 compiled run, which sets DeepSpeed's host floor
    (*_bench("2026-12-03-h200-w1-ckpt-zero2-compile-on-at-b40d818.json"),
     dict(arch=L7, compile=True, strategy="deepspeed", zero_stage=2, **CKPT4), False),
    (*_bench("2026-12-03-h200-w1-ckpt-zero2-compile-off-at-b40d818.json"),
     dict(arch=L7, strategy="deepspeed", zero_stage=2, **CKPT4), False),
    (*_bench("2026-12-03-h200-w1-ckpt-zero2-compile-auto-at-dc2ea95.json"),
     dict(arch=L7, compile=True, strategy="deepspeed", zero_stage=2, **CKPT4), False),
    (*_bench("2026-12-03-h200-w1-ckpt-zero1-compile-auto-at-1a9817c.json"),
     dict(arch=L7, compile=True, strategy="deepspeed", zero_stage=1, **CKPT4), False),
    (*_bench("2026-12-03-h200-w1-ckpt-zero1-compile-off-at-1a9817c.json"),
     dict(arch=L7, strategy="deepspeed", zero_stage=1, **CKPT4), False),
    (*_bench("2026-12-03-h200-w1-zero2-compile-auto-at-1a9817c.json"),
     dict(arch=L7, compile=True, strategy="deepspeed", zero_stage=2), True),
    (*_bench("2026-12-03-h200-w1-zero2-compile-auto-at-1a9817c-run2.json"),
     dict(arch=L7, compile=True, strategy="deepspeed", zero_stage=2), False),
    (*_bench("2026-12-03-h200-w1-zero2-compile-off-at-1a9817c.json"),
     dict(arch=L7, strategy="deepspeed", zero_stage=2), False),
    (*_bench("2026-12-03-h200-w1-ckpt-zero3-compile-off-at-9785409.json"),
     dict(arch=L7, strategy="deepspeed", zero_stage=3, **CKPT4), False),
    (*_full("2026-11-28-h200-full-finetune-eager.json"), dict(arch=L7, method="full", checkpointing=True), True),
    (*_full("2026-11-28-h200-full-finetune-compiled.json"),
     dict(arch=L7, method="full", checkpointing=True, compile=True), True),
]


@pytest.mark.parametrize("name, read, settings, fitted", MEASURED, ids=[f"{m[0]}:{i}" for i, m in enumerate(MEASURED)])
def test_prediction_matches_the_stored_measurement(name, read, settings, fitted):
    gpu_name, tokens_per_second, peak_gib = read(RESULTS / name)
    result = estimate(Scenario(gpu=gpu_from_device_name(gpu_name), **settings))
    assert result.peak_allocated_gib == pytest.approx(peak_gib, rel=0.10), "memory"
    assert result.tokens_per_second_per_gpu == pytest.approx(tokens_per_second, rel=0.25), "speed"


def test_measurements_cover_what_the_issue_asks():
    kinds = {(s.get("method", "lora"), s.get("strategy", "single"), s.get("offload", "none"), s.get("gpus_per_node", 1))
             for _, _, s, _ in MEASURED}
    assert {method for method, *_ in kinds} == {"lora", "qlora", "full"}
    assert {"ddp", "fsdp", "deepspeed"} <= {strategy for _, strategy, _, _ in kinds}
    assert {"none", "all"} <= {offload for _, _, offload, _ in kinds}
    assert {1, 2, 4} <= {gpus for *_, gpus in kinds}
    assert sum(not fitted for *_, fitted in MEASURED) >= 6  # out-of-sample predictions, not just fitted points


def _config(**flat):
    return build_config(flat)


def test_tutorial_falcon_180b_on_16_a100s():
    config = _config(**{"model.name": "tiiuae/falcon-180B", "model.gradient_checkpointing": True,
                        "train.batch_size": 1, "data.max_seq_len": 512,
                        "distributed.deepspeed_config": str(Path(__file__).resolve().parent.parent.parent / "shared"
                                                             / "reference" / "deepspeed_seed.json")})
    if not Path(config.distributed.deepspeed_config).is_file():  # outside this workspace: the copy in examples/
        config = replace(config, distributed=replace(config.distributed, deepspeed_config=str(
            Path(__file__).resolve().parent.parent / "examples" / "deepspeed_tutorial_zero3_offload.json")))
    plan = make_plan(config, GPUS["a100-80g"], 8, 2, price=1.5, dataset_tokens=9_900_000, internode_gbs=50)
    e = plan["estimate"]
    assert plan["setup"].startswith("ZeRO-3 + offload all")
    assert e["fits_training"] and not e["fits"]  # training fits; loading the whole model per GPU does not
    assert e["host_gib_per_node"] > 150  # the offloaded bf16 weights of 8 GPUs' shards
    assert plan["cost"] == pytest.approx(plan["hours"] * 16 * 1.5)
    assert 1 < plan["hours"] < 100
    assert any("loads the whole base model" in lint and "add --sharded-loading" in lint for lint in plan["lints"])
    zero3 = make_plan(replace(config, distributed=replace(config.distributed, sharded_loading=True)),
                      GPUS["a100-80g"], 8, 2, price=1.5, dataset_tokens=9_900_000, internode_gbs=50)
    assert zero3["estimate"]["fits"] and zero3["hours"] == plan["hours"]  # same training, loading now fits
    fsdp = make_plan(replace(config, distributed=replace(config.distributed, deepspeed_config="", strategy="fsdp",
                                                          sharded_loading=True)),
                     GPUS["a100-80g"], 8, 2, price=1.5, dataset_tokens=9_900_000, internode_gbs=50)
    assert fsdp["estimate"]["fits"] and fsdp["hours"] < plan["hours"]


def test_lints_name_known_bad_combinations():
    t4 = make_plan(_config(**{"model.name": "llama-2-7b", "model.dtype": "bf16",
                              "model.attn_implementation": "flash_attention_2", "adapter.method": "qlora"}),
                   GPUS["t4"], 1, 1, None, None)
    assert any("no bf16" in lint for lint in t4["lints"]) and any("Ampere" in lint for lint in t4["lints"])
    offload = make_plan(_config(**{"model.name": "llama-2-7b", "distributed.strategy": "deepspeed",
                                   "distributed.offload": "all", "train.batch_size": 1}), GPUS["h100"], 2, 1, None, None)
    assert any("CPU offload while everything fits" in lint for lint in offload["lints"])
    assert any("FSDP2 fits too and is faster" in lint for lint in offload["lints"])
    huge = make_plan(_config(**{"model.name": "llama-2-70b", "train.batch_size": 64, "data.max_seq_len": 8192}),
                     GPUS["l4"], 1, 1, None, None)
    assert not huge["alternatives"] and any("even micro-batch 1" in lint for lint in huge["lints"])


def test_alternatives_fit_and_come_fastest_first():
    plan = make_plan(_config(**{"model.name": "llama-2-7b", "train.batch_size": 16, "data.max_seq_len": 4096}),
                     GPUS["a100-40g"], 2, 1, None, None)
    speeds = [a["real_tokens_per_second"] for a in plan["alternatives"]]
    assert speeds == sorted(speeds, reverse=True) and speeds
    assert all(a["gpu_needed_gib"] <= GPUS["a100-40g"].memory_gib for a in plan["alternatives"])
    assert plan["strategy_auto"]  # auto picked between DDP and FSDP2 and said why


def test_train_auto_uses_the_plan_on_known_gpus():
    eager = _config(**{"model.name": "llama-2-7b", "train.batch_size": 4, "model.gradient_checkpointing": True,
                       "model.compile": "off"})
    name, why = auto_engine(eager, 2, "NVIDIA H100 80GB HBM3", 8)
    assert name == "fsdp" and "fastest" in why  # measured: eager FSDP2 beats eager DDP per GPU
    compiled = _config(**{"model.name": "llama-2-7b", "train.batch_size": 4, "model.gradient_checkpointing": True,
                          "model.compile": "on"})
    assert auto_engine(compiled, 2, "NVIDIA H100 80GB HBM3", 8)[0] == "ddp"  # compiled: DDP 0.99 vs FSDP2 0.86
    assert auto_engine(eager, 2, "Some Future GPU", 8) is None


def test_local_config_json_and_falcon_layouts(tmp_path, tiny_llama):
    arch = from_config_json(Path(tiny_llama) / "config.json")
    assert arch.hidden == 32 and arch.kv_heads == 2
    old = tmp_path / "falcon-old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32,
                                                 "num_attention_heads": 71, "multi_query": True, "vocab_size": 65024}))
    assert from_config_json(old / "config.json").total_params == ARCHITECTURES["falcon-7b"].total_params


def test_cli_prints_a_plan_and_json(capsys, tiny_llama, alpaca_file):
    assert main(["plan", "--model", str(tiny_llama), "--data", str(alpaca_file), "--gpu", "l4",
                 "--price-per-gpu-hour", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "time:" in text and "$" in text
    assert main(["plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpus", "4", "--json",
                 "--dataset-tokens", "1e7"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["training_tokens"] == 1e7 and plan["estimate"]["memory_gib"]["weights"] > 2


@pytest.mark.parametrize("args, message", [
    (["--gpu", "b300"], "known: h100"),
    (["--gpus", "0"], "at least 1"),
    (["--price-per-gpu-hour", "-1"], "0 or more"),
    (["--model", "someone/unknown-model"], "built-in table"),
])
def test_bad_input_gets_one_clear_line(args, message, capsys):
    base = ["plan", "--model", "llama-2-7b"]
    assert main(base + args if args[0] != "--model" else ["plan"] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreadable_model_config_names_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert str(tmp_path / "config.json") in capsys.readouterr().err


FALCON_36 = replace(ARCHITECTURES["falcon-180b"], layers=36, name="falcon-180b-36-layers")


@pytest.mark.parametrize("name, arch", [("2026-11-28-h200-qlora-70b.json", ARCHITECTURES["llama-2-70b"]),
                                        ("2026-12-07-h100-qlora-falcon-180b-36-layers-at-dee25bc.json", FALCON_36)])
def test_large_qlora_is_predicted(name, arch):
    """QLoRA beyond 7B, mb 1, checkpointing, compiled layers, one GPU: Llama-2-70B on an H200, and 36 of
    Falcon-180B's 80 layers on an H100 (numbers copied from the issue tracker's report). Neither set a constant.
    Before the fixed cost per micro-batch was counted per layer (not per weight) and the 4-bit dequantisation at
    its profiled kernel rate (not the 7B's host-bound step), both were predicted at less than half their speed."""
    measured = json.loads((RESULTS / name).read_text())
    result = estimate(Scenario(gpu=gpu_from_device_name(measured["gpu"]), arch=arch, method="qlora",
                               checkpointing=True, compile=True))
    assert result.peak_allocated_gib == pytest.approx(measured["peak_gpu_gib"], rel=0.10)
    assert result.tokens_per_second_per_gpu == pytest.approx(measured["tokens_per_second"], rel=0.25)
    assert not result.notes  # the GPU's work, not the host's launches, sets these steps


def test_qlora_7b_step_is_host_bound_and_wide_layers_are_not():
    """The 7B QLoRA step launched op by op waits on the host (its profile: enqueue time = wall time); Falcon-180B's
    layers are wide enough that the GPU's matmuls and dequantisation take far longer than their launches."""
    small = estimate(Scenario(gpu=GPUS["h200"], arch=L7, method="qlora", checkpointing=True, compile=True))
    assert any("host-bound" in note for note in small.notes)
    falcon = estimate(Scenario(gpu=GPUS["h200"], arch=ARCHITECTURES["falcon-180b"], method="qlora",
                               checkpointing=True, compile=True))
    assert not falcon.notes and falcon.memory_gib["dequantised matrix"] == pytest.approx(14848 * 59392 * 2 / 2**30)


@pytest.mark.parametrize("name, strategy, fetch, compiled", [
    ("h200x2-lora-70b-fsdp", "fsdp", "layer", True),
    ("h200x2-lora-70b-zero3", "deepspeed", "module", False),
    ("h200x4-lora-70b-fsdp", "fsdp", "layer", True),
    ("h200x4-lora-70b-zero3", "deepspeed", "layer", False),
    ("h200x4-lora-70b-zero3-module-fetch", "deepspeed", "module", False),
])
def test_70b_lora_sharded_is_predicted(name, strategy, fetch, compiled):
    """Llama-2-70B LoRA, --init random --sharded-loading, 2 and 4 H200s, mb 1 per GPU, checkpointing
    (benchmarks/gpu_70b.py). Memory per GPU within 5% (FSDP2 on 4 GPUs is the 5%, under). Speed within 25%: FSDP2
    about 8% slow; the ZeRO-3 runs set ZERO3_GATHER_LINK_SHARE with the 7B's (per module 13% slow on 2 GPUs,
    17% fast on 4; a layer at a time within 1%)."""
    import statistics

    measured = json.loads((RESULTS / f"2026-11-28-{name}.json").read_text())
    workers = 4 if "h200x4" in name else 2
    per_gpu = statistics.median(m["tokens_per_second"] for m in measured["metrics"][2:]) / workers
    result = estimate(Scenario(gpu=gpu_from_device_name(measured["gpu"]), arch=ARCHITECTURES["llama-2-70b"],
                               method="lora", checkpointing=True, compile=compiled, gpus_per_node=workers,
                               strategy=strategy, sharded_loading=True, zero3_fetch=fetch))
    assert result.peak_allocated_gib == pytest.approx(measured["peak_gpu_gib"], rel=0.05)
    assert result.tokens_per_second_per_gpu == pytest.approx(per_gpu, rel=0.25)


def test_a_json_stage_is_read_as_training_reads_it(tmp_path):
    """"stage": "auto" is --zero-stage, as the engine fills it (the plan read it as 3); a JSON without a stage
    plans as ZeRO-3 (the plan has no stage-0 engine)."""
    from zerotune.plan.report import scenario_from_config

    ds = tmp_path / "ds.json"
    for content, zero_stage, expected in [('{"zero_optimization": {"stage": "auto"}}', 2, 2),
                                          ('{"zero_optimization": {"stage": "auto"}}', 3, 3),
                                          ('{"zero_optimization": {"stage": 1}}', 3, 1), ("{}", 2, 3)]:
        ds.write_text(content)
        config = _config(**{"model.name": "llama-2-7b", "distributed.deepspeed_config": str(ds),
                            "distributed.zero_stage": zero_stage})
        scenario = scenario_from_config(config, GPUS["h100"], 2, 1)
        assert (scenario.strategy, scenario.zero_stage) == ("deepspeed", expected), content


def test_a_preference_objective_costs_two_sequences_a_pair_and_dpo_a_reference_pass():
    """Per pair: two sequences through the forward (memory and tokens of a micro-batch twice SFT's), scored by the
    chunked head as SFT's loss is, and for DPO a forward without gradient more per token; full fine-tuning's DPO
    keeps a reference copy."""
    def plan(**settings):
        return make_plan(_config(**{"model.name": "llama-2-7b", "train.batch_size": 2, "data.max_seq_len": 1024,
                                    "model.gradient_checkpointing": True, "train.max_steps": 100, **settings}),
                         GPUS["h100"], 1, 1, None, None)

    sft_rows, simpo, dpo = plan(**{"train.batch_size": 4}), plan(**{"objective.name": "simpo"}), \
        plan(**{"objective.name": "dpo"})  # 2 pairs: the 4 rows of SFT's micro-batch 4
    assert simpo["training_tokens"] == sft_rows["training_tokens"] == dpo["training_tokens"]
    assert simpo["estimate"]["memory_gib"]["activations"] == pytest.approx(sft_rows["estimate"]["memory_gib"]["activations"])
    # the chunked head scores pairs without full logits, as it computes SFT's loss; --no-chunked-loss builds them
    assert simpo["estimate"]["peak_allocated_gib"] == pytest.approx(sft_rows["estimate"]["peak_allocated_gib"])
    unchunked = plan(**{"objective.name": "simpo", "model.chunked_loss": False})
    assert unchunked["estimate"]["peak_allocated_gib"] > simpo["estimate"]["peak_allocated_gib"]
    assert dpo["estimate"]["tokens_per_second_per_gpu"] < simpo["estimate"]["tokens_per_second_per_gpu"]
    assert "pairs/s" in " ".join(dpo["notes"]) and "reference" in " ".join(dpo["notes"])
    assert dpo["pairs_per_second"] == pytest.approx(dpo["estimate"]["tokens_per_second_per_gpu"] / 2048)
    full = plan(**{"objective.name": "dpo", "adapter.method": "full", "train.batch_size": 1})
    assert full["estimate"]["memory_gib"]["reference copy"] == full["estimate"]["memory_gib"]["weights"]
    precomputed = plan(**{"objective.name": "dpo", "objective.reference": "precomputed"})  # no reference forward
    assert precomputed["estimate"]["tokens_per_second_per_gpu"] == simpo["estimate"]["tokens_per_second_per_gpu"]
