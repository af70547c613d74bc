"""train.cuda_graph on CPU: its config checks, and the attention-mask hint it relies on (the replayed graphs
themselves run on the GPU: tests/test_gpu.py::test_cuda_graph_steps_equal_op_by_op)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from zerotune.speed.plain_causal import NAME, install_plain_causal_hint, is_plain_causal, plain_causal
from zerotune.config import build_config
from zerotune.errors import ConfigError


@pytest.mark.parametrize("settings,message", [
    ({"distributed.use_cpu": True}, "train.cuda_graph: needs one worker on a CUDA GPU"),
    ({"distributed.num_workers": 2}, "train.cuda_graph: needs one worker on a CUDA GPU"),
    ({"model.compile": "off"}, "train.cuda_graph: needs compiled layers"),
    ({"model.attn_implementation": "eager"}, "train.cuda_graph: needs --attn-implementation sdpa"),
])
def test_cuda_graph_config_errors(settings, message):
    for on in (True, "on"):  # YAML's and an override's `true` mean on
        with pytest.raises(ConfigError, match=message):
            build_config({"train.cuda_graph": on, **settings})
    assert build_config({"train.cuda_graph": True}).train.cuda_graph == "on"  # accepted, LoRA dropout included
    config = build_config(settings)  # auto (the default) never refuses: it turns graphs off where they do not fit
    assert config.train.cuda_graph == "auto"


def test_cuda_graph_flag_alone_means_on_and_takes_no_following_argument():
    from zerotune.cli import config_from_args, parse_args

    args = parse_args(["train", "--cuda-graph", "train.lr=0.003"])
    config = config_from_args(args)
    assert config.train.cuda_graph == "on" and config.train.lr == 0.003
    assert config_from_args(parse_args(["train", "--cuda-graph", "off"])).train.cuda_graph == "off"
    assert config_from_args(parse_args(["train", "--compile"])).model.compile == "on"
    assert config_from_args(parse_args(["train"])).train.cuda_graph == "auto"


@pytest.mark.parametrize("change,reason", [
    ({}, None),
    ({"device_type": "cpu"}, "needs one worker on a CUDA GPU (this run has single on cpu)"),
    ({"strategy": "ddp"}, "needs one worker on a CUDA GPU (this run has ddp on cuda)"),
    ({"compiled": False}, "needs compiled layers"),
    ({"method": "full"}, "full fine-tuning was not tested in a graph"),
    ({"attention": "eager"}, "needs SDPA attention (this run would use eager"),
    ({"attention": "flash_attention_2"}, "needs SDPA attention (this run would use flash_attention_2"),
    ({"fixed_shapes": False}, "unpacked examples of varying length"),
])
def test_cuda_graph_auto_takes_graphs_only_where_tested(change, reason):
    from zerotune.config import build_config
    from zerotune.resolve import explain_cuda_graph

    def wanted(setting, *, method, fixed_shapes, **rest):
        config = build_config({"train.cuda_graph": setting, "adapter.method": method})
        return explain_cuda_graph(config, fixed_shapes=lambda: fixed_shapes, **rest)

    run = dict(device_type="cuda", strategy="single", compiled=True, method="qlora", attention="sdpa",
               fixed_shapes=True) | change
    on, why = wanted("auto", **run)
    if reason is None:
        assert on and why.startswith("LoRA/QLoRA on one CUDA worker with one batch shape")
    else:
        assert not on and why.startswith(reason)
    assert wanted("off", **run)[0] is False
    if reason is None or "full" in reason or "unpacked" in reason:  # on takes these (and needs no more)
        assert wanted("on", **run)[0] is True
    else:
        with pytest.raises(ConfigError, match=re.escape(f"train.cuda_graph: {reason}")):
            wanted("on", **run)


def test_plain_causal_hint_leaves_logits_unchanged(tiny_llama):
    """The hinted attention gives the stock SDPA logits bit for bit (called as the training loop calls it, no
    KV cache), for a plain batch (no mask: SDPA causal), a padded one, a packed one with two sequences in a
    row, and packed rows of one sequence each."""
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32, attn_implementation="sdpa")
    hinted = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32, attn_implementation="sdpa")
    assert install_plain_causal_hint(hinted) and hinted.config._attn_implementation == NAME
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batches = {
        "plain": ({"input_ids": ids}, True),
        "padded": ({"input_ids": ids, "attention_mask": mask}, False),
        "packed": ({"input_ids": ids, "position_ids": torch.tensor([list(range(5)) + list(range(7)),
                                                                    list(range(12))])}, False),
        "one per row": ({"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1)}, True),
    }
    for name, (batch, plain) in batches.items():
        assert is_plain_causal(batch) is plain, name
        with torch.no_grad():
            expected = stock(**batch, use_cache=False).logits
            with plain_causal(plain):
                got = hinted(**batch, use_cache=False).logits
        assert torch.equal(got, expected), name
    # The hint is what makes a plain batch skip the mask: told wrongly, a packed row attends across examples.
    with torch.no_grad(), plain_causal(True):
        crossed = hinted(**batches["packed"][0], use_cache=False).logits
        separate = stock(**batches["packed"][0], use_cache=False).logits
    assert not torch.allclose(crossed[0, 5:], separate[0, 5:])


def test_one_plain_flag_per_step_bounds_the_graphs_of_a_shape():
    """Packed rows of one shape, grad_accum 4: each micro-batch is plain or not (one example per row, or two),
    16 combinations. With one flag per step they make two signatures (within step_graphs.LIMIT), and a step
    is plain only when every micro-batch is."""
    import itertools

    from zerotune.speed.step_graphs import StepGraphs, signature, step_plain

    one = torch.arange(8).view(1, 8)
    two = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    steps = [[{"input_ids": one, "position_ids": positions} for positions in combination]
             for combination in itertools.product([one, two], repeat=4)]
    flags = [[is_plain_causal(batch) for batch in batches] for batches in steps]
    assert len({signature(batches, f) for batches, f in zip(steps, flags)}) == 16  # per micro-batch
    merged = {signature(batches, step_plain(f)) for batches, f in zip(steps, flags)}
    assert len(merged) == 2 <= StepGraphs.LIMIT
    assert step_plain([True] * 4) == [True] * 4 and step_plain([True, False, True, True]) == [False] * 4


def test_hint_is_refused_for_other_attention(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32, attn_implementation="eager")
    assert not install_plain_causal_hint(model)
    assert model.config._attn_implementation == "eager"


def _strategy_with(lr_as_tensor: bool, config):
    from zerotune.strategies.single import SingleDeviceStrategy

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    strategy = SingleDeviceStrategy(config, torch.device("cpu"))
    lr = torch.tensor(config.train.lr) if lr_as_tensor else config.train.lr
    strategy.wrap(model, lambda params: torch.optim.AdamW(params, lr=lr, fused=True),
                  lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step), 10)
    return model, strategy


@pytest.mark.parametrize("saved_as_tensor", [False, True])
def test_checkpoint_resumes_across_learning_rate_kinds(saved_as_tensor, tmp_path):
    """A run with --cuda-graph keeps its learning rate in a tensor the scheduler fills; one without keeps a
    number. A checkpoint from either resumes in the other: the same learning rate and schedule, in the
    resuming run's own kind."""
    config = build_config({"train.lr": 0.01})
    model, first = _strategy_with(saved_as_tensor, config)
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        first.optimizer_step(model, torch.tensor(1.0))
        first.advance_schedule()
    first.save_state(model, tmp_path)
    assert first.current_lr() == pytest.approx(0.0025)
    model, second = _strategy_with(not saved_as_tensor, config)
    second.load_state(model, tmp_path)
    lr = second.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) is (not saved_as_tensor)
    assert float(lr) == pytest.approx(0.0025) and second.current_lr() == pytest.approx(0.0025)
    second.scheduler.step()
    assert second.optimizer.param_groups[0]["lr"] is lr if isinstance(lr, torch.Tensor) else True
    assert float(second.optimizer.param_groups[0]["lr"]) == pytest.approx(0.00125)
    assert second.current_lr() == pytest.approx(0.00125)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_graph_without_a_gpu_is_refused_before_the_model_loads(config_for, monkeypatch):
    from helpers import train

    import zerotune.strategies.base as base

    monkeypatch.setattr(base.Strategy, "load_base_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"train.cuda_graph: needs one worker on a CUDA GPU \(this run has single on cpu\)"):
        train(config_for(**{"train.cuda_graph": "on"}))


def test_cuda_graph_on_with_flash_attention_is_refused_before_the_model_loads(config_for, monkeypatch):
    """--attn-implementation auto picks flash-attn where it is installed; --cuda-graph on then stops before the
    model loads (auto would leave graphs off and say why)."""
    from helpers import train

    import zerotune.resolve as resolve
    import zerotune.strategies.base as base

    monkeypatch.setattr(resolve, "explain_attention", lambda name, device_type: ("flash_attention_2", "a test"))
    monkeypatch.setattr(base.Strategy, "load_base_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=re.escape("train.cuda_graph: needs SDPA attention (this run would use "
                                                    "flash_attention_2; pass --attn-implementation sdpa)")):
        train(config_for(**{"train.cuda_graph": "on"}))
