"""--sharded-loading. FSDP2: built on the meta device, each rank reads only its own rows of every weight.
DeepSpeed ZeRO-3: built inside deepspeed.zero.Init by transformers, partitioned as created."""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_config
from helpers import train
from zerotune.config import build_config
from zerotune.errors import ConfigError
from zerotune.strategies.sharded_loading import checkpoint_name

pytestmark = pytest.mark.slow


def _fsdp(tiny_llama, alpaca_file, output, **extra):
    settings = {"distributed.num_workers": 2, "distributed.use_cpu": True, "distributed.strategy": "fsdp",
                "train.batch_size": 2, "train.max_steps": 2, "data.eval_fraction": 0.1, "train.eval_every": 100}
    settings.update(extra)
    return make_config(tiny_llama, alpaca_file, output, **settings)


def test_lora_starts_from_the_same_weights_as_the_default_path(tiny_llama, alpaca_file, tmp_path):
    sharded = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "sharded", **{"distributed.sharded_loading": True}))
    # one process, the same global batch (2 x grad_accum 2), weights loaded the usual way
    plain = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "plain", **{"distributed.num_workers": 1,
                                                                         "distributed.strategy": "single",
                                                                         "train.grad_accum": 2}))
    # the step-0 eval loss (eval_every > max_steps: evaluated at 0 and at the end) and the step-1 loss see only
    # the base weights (LoRA B starts at zero)
    assert sharded.eval_losses[0] == pytest.approx(plain.eval_losses[0], rel=1e-6)
    assert sharded.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    saved = json.loads((tmp_path / "sharded" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and (tmp_path / "sharded" / "adapter" / "adapter_model.safetensors").is_file()


TRAINING = {"lora": {"adapter.method": "lora", "train.lr": 1e-2, "train.max_steps": 3, "data.eval_fraction": 0.0},
            "full": {"adapter.method": "full", "train.lr": 1e-3, "train.max_steps": 3, "data.eval_fraction": 0.0}}


@pytest.fixture(scope="module")
def one_process(tiny_llama, alpaca_file, tmp_path_factory):
    """method -> per-step losses of one process loading the model the default way, at the global batch of the 2
    workers (2 x grad_accum 2); each run once, for the FSDP2 and the ZeRO-3 comparisons alike."""
    losses = {}

    def run(method: str) -> list[float]:
        if method not in losses:
            out = tmp_path_factory.mktemp(f"one-process-{method}") / "run"
            losses[method] = train(_fsdp(tiny_llama, alpaca_file, out, **TRAINING[method], **{
                "distributed.num_workers": 1, "distributed.strategy": "single", "train.grad_accum": 2})).losses
        return losses[method]
    return run


def test_full_finetune_trains_identically(one_process, tiny_llama, alpaca_file, tmp_path):
    sharded = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "sharded", **TRAINING["full"],
                          **{"distributed.sharded_loading": True}))
    assert sharded.losses == pytest.approx(one_process("full"), rel=1e-5)


ZERO3_PROBE = """
import json, os, sys, torch, torch.distributed as dist
from zerotune.config import build_config
from zerotune.strategies.deepspeed import DeepSpeedStrategy
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
config = build_config(json.loads(sys.argv[1]))
model = DeepSpeedStrategy(config, torch.device("cpu"), 0, 1).load_base_model(torch.float32, 3)
params = list(model.parameters())
print(json.dumps({"partitioned": all(p.numel() == 0 and hasattr(p, "ds_numel") for p in params),
                  "elements": sum(p.ds_numel for p in params)}))
"""


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_zero3_sharded_loading_creates_partitioned_parameters(init, tiny_llama, alpaca_file, tmp_path):
    """Straight out of loading (or of random initialisation), every parameter is a ZeRO-3 partition
    (zero.Init), none a whole tensor."""
    import socket
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    pytest.importorskip("deepspeed")
    settings = {"model.name": str(tiny_llama), "model.dtype": "fp32", "data.path": str(alpaca_file),
                "distributed.strategy": "deepspeed", "distributed.zero_stage": 3,
                "distributed.sharded_loading": True, "train.batch_size": 2, "output.dir": str(tmp_path / "o"),
                "model.init": init}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", ZERO3_PROBE, json.dumps(settings), str(port)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    whole = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_llama)).parameters())
    assert seen == {"partitioned": True, "elements": whole}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_sharded_loading_trains_like_one_process(method, one_process, tiny_llama, alpaca_file, tmp_path):
    """2 workers, ZeRO-3, the model loaded partitioned: the same per-step losses as one process loading it
    the default way, for LoRA and for full fine-tuning."""
    pytest.importorskip("deepspeed")
    sharded = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "sharded", **TRAINING[method], **{
        "distributed.strategy": "deepspeed", "distributed.zero_stage": 3, "distributed.sharded_loading": True}))
    assert sharded.losses == pytest.approx(one_process(method), rel=1e-5)


def test_random_init_under_fsdp_is_the_same_model_for_any_worker_count(tiny_llama, alpaca_file, tmp_path):
    """--init random --sharded-loading (how the 70B benchmarks start): nothing is read, every rank draws each
    weight whole from one seeded generator and keeps its rows, so 2 workers train the model 1 worker trains."""
    extra = {"model.init": "random", "distributed.sharded_loading": True, "data.eval_fraction": 0.0,
             "train.max_steps": 3, "train.lr": 1e-2}
    two = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "two", **extra))
    one = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "one", **extra,
                      **{"distributed.num_workers": 1, "train.grad_accum": 2}))
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    # a random model: the first loss sits near ln(vocabulary), not at the trained tiny model's
    assert two.losses[0] == pytest.approx(math.log(300), rel=0.05)


def test_random_init_under_zero3_trains_the_same_model_for_any_worker_count(tiny_llama, alpaca_file, tmp_path):
    """--init random --sharded-loading under ZeRO-3: each module is initialised inside zero.Init (partitioned:
    the probe above), and 2 workers train the model 1 worker trains (same per-step losses)."""
    pytest.importorskip("deepspeed")
    extra = {"model.init": "random", "distributed.sharded_loading": True, "data.eval_fraction": 0.0,
             "train.max_steps": 3, "train.lr": 1e-2, "distributed.strategy": "deepspeed",
             "distributed.zero_stage": 3}
    two = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "two", **extra))
    one = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "one", **extra,
                      **{"distributed.num_workers": 1, "train.grad_accum": 2}))
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.losses[0] == pytest.approx(math.log(300), rel=0.05)


def test_zero3_runs_leave_no_global_state_behind(tiny_llama, alpaca_file, tmp_path):
    """Two ZeRO-3 --sharded-loading runs in one process (a notebook, or this suite): the second must not use the
    first's destroyed process group, and afterwards transformers builds whole models again, not zero.Init
    partitions (both broke later tests here before DeepSpeedStrategy.close reset them)."""
    pytest.importorskip("deepspeed")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    extra = {"model.init": "random", "distributed.sharded_loading": True, "data.eval_fraction": 0.0,
             "train.max_steps": 2, "distributed.strategy": "deepspeed", "distributed.zero_stage": 3,
             "distributed.num_workers": 1}
    first = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "first", **extra))
    second = train(_fsdp(tiny_llama, alpaca_file, tmp_path / "second", **extra))
    assert first.losses == pytest.approx(second.losses, rel=1e-6)
    assert not is_deepspeed_zero3_enabled()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama))
    assert all(p.numel() > 0 and not p.is_meta for p in model.parameters())


def test_names_map_to_the_files_and_bad_combinations_are_refused():
    assert checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert checkpoint_name("model.norm.weight") == "model.norm.weight"
    for extra in ({"distributed.strategy": "ddp"}, {"distributed.strategy": "fsdp", "adapter.method": "qlora"}):
        with pytest.raises(ConfigError, match="sharded_loading needs --strategy fsdp or DeepSpeed ZeRO-3"):
            build_config({"distributed.sharded_loading": True, **extra})


# The tutorial's ZeRO-3 + CPU-offload JSON with --sharded-loading: tests/test_distributed.py
# (test_tutorial_json_with_sharded_loading_matches_its_default_load), which shares the JSON's usual-load run.
