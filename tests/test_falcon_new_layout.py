"""Falcon's new decoder layout (Falcon-40B/180B): grouped KV heads in one fused query_key_value, parallel
attention with two layer norms, a head tied to the embeddings. Trained through the CLI on the default settings
and with each speed feature that runs on CPU, against the plain path; the settings a GPU run would resolve; the
plain-causal probe; QLoRA's random NF4 builder."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math

import pytest
import torch

from conftest import corpus
from zerotune.cli import main
from zerotune.config import AdapterConfig, ModelConfig, build_config
from zerotune.tiny import save_tiny_model

# the layout of Falcon-180B's config.json at toy size: 4 query heads in 2 KV groups, parallel attention, tied head
LAYOUT = dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, tie_word_embeddings=True, bias=False)
PLAIN = ["--no-chunked-loss", "--fused-projections", "off", "--compile", "off"]  # PEFT's path, stock loss, eager


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "falcon-new", corpus(), "falcon", vocab_size=300,
                           hidden_size=32, layers=2, heads=4, seed=0, **LAYOUT)


def cli_losses(model, data, out, *flags) -> list[float]:
    """`zerotune train` on every default but the run's length and tracking; the losses it logged."""
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "3",
                 "--max-seq-len", "128", "--tracking", "none", *flags]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [event["loss"] for event in events if "loss" in event and "eval_loss" not in event]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    return losses


@pytest.fixture(scope="module")
def plain_losses(falcon, alpaca_file, tmp_path_factory) -> list[float]:
    """The plain path's losses, run once for every comparison with it below."""
    return cli_losses(falcon, alpaca_file, tmp_path_factory.mktemp("plain") / "run", *PLAIN)


def test_the_tiny_model_has_falcon_180bs_layout(falcon):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(falcon)
    attention = model.transformer.h[0].self_attention
    assert (attention.num_heads, attention.num_kv_heads, model.config.parallel_attn) == (4, 2, True)
    assert attention.query_key_value.out_features == (4 + 2 * 2) * 8  # queries, then a key and value per KV group
    assert hasattr(model.transformer.h[0], "ln_attn") and hasattr(model.transformer.h[0], "ln_mlp")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


@pytest.mark.parametrize("flags", [
    [],  # every "auto" as shipped (on CPU: eager, chunked loss, PEFT's projections)
    pytest.param(["--fused-projections", "on"], marks=pytest.mark.slow),
    pytest.param(["--gradient-checkpointing"], marks=pytest.mark.slow),
    pytest.param(["--fused-projections", "on", "--gradient-checkpointing"], marks=pytest.mark.slow),
    pytest.param(["--compile", "on", "--fused-projections", "on", "--gradient-checkpointing"], marks=pytest.mark.slow),
    pytest.param(["--compile", "on"], marks=pytest.mark.slow),
], ids=["defaults", "fused", "checkpointing", "fused-checkpointing", "compiled-fused-checkpointing", "compiled"])
def test_cli_training_with_speed_features_equals_the_plain_path(falcon, plain_losses, alpaca_file, tmp_path, capsys,
                                                                flags):
    """The defaults and each speed feature forced on give the plain path's losses (eager PEFT, stock loss)."""
    losses = cli_losses(falcon, alpaca_file, tmp_path / "fast", *flags)
    out = capsys.readouterr().out
    if "--fused-projections" in flags:
        assert "adapter.fused_projections: 8 groups of projections fused" in out  # 4 per layer, each of one
    tolerance = 1e-4 if "--compile" in flags else 1e-5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=tolerance, atol=0)


@pytest.mark.slow
def test_packed_training_with_speed_features_equals_the_plain_packed_path(falcon, alpaca_file, tmp_path, capsys):
    plain = cli_losses(falcon, alpaca_file, tmp_path / "plain", "--packing", *PLAIN)
    fast = cli_losses(falcon, alpaca_file, tmp_path / "fast", "--packing", "--fused-projections", "on",
                      "--gradient-checkpointing")
    assert "adapter.fused_projections: 8 groups of projections fused" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)


def test_a_gpu_run_resolves_every_auto(falcon, alpaca_file):
    """What `zerotune train` would decide on one H200 for this layout, QLoRA with checkpointing (the flagship
    run's shape): compiled layers, the compiled 4-bit matmul, checkpoints around each layer; step graphs only with
    packing (then kept if the plain-causal probe passes, below); fused projections are LoRA's only."""
    from zerotune.resolve import Machine, resolve

    h200 = Machine("cuda", "NVIDIA H200", 141 * 2**30, 1, True)
    config = build_config({"model.name": str(falcon), "data.path": str(alpaca_file), "adapter.method": "qlora",
                           "model.gradient_checkpointing": True})
    settings = resolve(config, h200)
    assert (settings.strategy, settings.dtype, settings.attention, settings.compile) == ("single", "bf16", "sdpa", True)
    assert settings.compiled_nf4 and not settings.fused_projections and not settings.cuda_graph
    rows = {d.key: d for d in settings.decisions}
    assert rows["gradient checkpoint placement"].decided == "around each layer"
    packed = resolve(build_config({**{"model.name": str(falcon), "data.path": str(alpaca_file)},
                                   "data.packing": True, "model.gradient_checkpointing": True}), h200)
    assert packed.cuda_graph and packed.fused_projections and packed.compile
    placement = {d.key: d for d in packed.decisions}["gradient checkpoint placement"]  # LoRA dropout 0.05 default
    assert (placement.decided, placement.why) == ("around each layer", "--lora-dropout draws random numbers inside "
                                                                       "the layer")


def _lora_falcon(falcon, method="lora"):
    from zerotune import adapters
    from zerotune.model import load_model

    model = load_model(ModelConfig(name=str(falcon)), method, torch.device("cpu"), torch.float32)
    return adapters.apply_method(model, AdapterConfig(method=method, dropout=0.0), seed=0)


def test_plain_causal_probe_keeps_step_graphs_on_this_layout(falcon):
    """transformers 5.17's Falcon added None to its scores without a mask (the first GPU try failed there); the
    installed version's takes the hint, and the probe, comparing the hinted logits with the masked ones, keeps it."""
    from zerotune import speed
    from zerotune.speed import plain_causal

    model, notes = _lora_falcon(falcon), []
    assert speed._plain_causal_hint(model, build_config({}), notes, contextlib.nullcontext) is True
    assert notes == [] and model.config._attn_implementation == plain_causal.NAME


def test_chunked_loss_on_the_tied_head_equals_the_stock_loss(falcon):
    """The chunked loss reads the head's weight, here the embeddings': same loss and LoRA gradients as the model's
    own cross-entropy."""
    from zerotune.speed.chunked_loss import install_chunked_loss

    ids = torch.randint(300, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for chunked in (False, True):
        model = _lora_falcon(falcon)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        if chunked:
            head, why_not = install_chunked_loss(model)
            assert why_not is None
            with head.computing(ids):
                loss = model(input_ids=ids).logits / (ids.numel() - ids.size(0))
        else:
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=0)
    for chunked, stock in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(chunked, stock, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("bitsandbytes"), reason="bitsandbytes is part of zerotune[all]")
def test_random_nf4_qlora_trains_this_layout_on_cpu(falcon, alpaca_file, tmp_path):
    """--init random --method qlora: every adapted FalconLinear built as NF4 (bitsandbytes' CPU backend), finite
    losses that fall."""
    losses = cli_losses(falcon, alpaca_file, tmp_path / "run", "--init", "random", "--method", "qlora",
                        "--gradient-checkpointing", "--lr", "1e-2", "--lora-dropout", "0")
    assert losses[-1] < losses[0]
