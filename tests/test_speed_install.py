"""speed.install: the one call that puts the speed features on a model, in a fixed order, saying in one line
each what it left out and why. The order matters: the hub-kernel dispatch bypass comes before anything wraps or
traces the attention forwards, fused projections and the compiled 4-bit matmul before the layers compile."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import zerotune.speed.chunked_loss as chunked_loss
import zerotune.speed.compile as speed_compile
import zerotune.speed.fused_check as fused_check
import zerotune.speed.nf4 as nf4
import zerotune.speed.plain_causal as plain_causal
from zerotune import speed
from zerotune.config import build_config
from zerotune.errors import ConfigError


def _settings(compiled=True, graphs=False, fused=False, nf4=False, chunked=True):
    """Settings as zerotune.resolve decides them (these tests cover what install does with them)."""
    from zerotune.resolve import Settings

    return Settings(launcher="inprocess", device_type="cuda", strategy="single", zero_stage=None, dtype="bf16",
                    attention="sdpa", compile=compiled, fused_projections=fused, cuda_graph=graphs,
                    compiled_nf4=nf4, chunked_loss=chunked)


def _model(attention="sdpa"):
    model = torch.nn.Module()
    model.config = SimpleNamespace(_attn_implementation=attention)
    return model


@pytest.fixture
def calls(monkeypatch):
    """Every feature's installer replaced by one that records its name (and the hint succeeds unless told)."""
    calls = []
    monkeypatch.setattr(speed_compile, "without_hub_kernel_dispatch", lambda model: calls.append("bypass") or 0)
    monkeypatch.setattr(chunked_loss, "install_chunked_loss",
                        lambda model, compiled: calls.append("chunked_loss") or ("head", None))
    monkeypatch.setattr(fused_check, "install_checked",
                        lambda model, precision, swiglu: calls.append("fused_projections") or (8, None))
    monkeypatch.setattr(plain_causal, "install_plain_causal_hint",
                        lambda model: calls.append("plain_causal_hint") or model.config._attn_implementation == "sdpa")
    monkeypatch.setattr(speed, "_plain_causal_problem", lambda model, precision: None)  # its probe: below
    monkeypatch.setattr(nf4, "install_compiled_nf4", lambda model: calls.append("nf4") or 14)
    monkeypatch.setattr(speed_compile, "compile_layers", lambda model: calls.append("compile") or 2)
    monkeypatch.setattr(speed_compile, "graph_breaks", lambda: {"before": 1})
    return calls


def test_lora_installs_in_order_and_says_what(calls):
    config = build_config({"adapter.fused_projections": "on"})
    installed = speed.install(_model(), config, _settings(graphs=True, fused=True), precision=contextlib.nullcontext)
    assert calls == ["bypass", "chunked_loss", "fused_projections", "plain_causal_hint", "compile"]
    assert installed.notes == ["adapter.fused_projections: 8 groups of projections fused (q/k/v, gate/up, o, down)",
                               "compiling 2 decoder layers (torch.compile; the first steps are slow)"]
    assert (installed.loss_head, installed.graphs, installed.fused_groups, installed.compiled_layers) == \
        ("head", True, 8, 2)
    assert installed.graph_breaks_before == {"before": 1}


def test_qlora_compiles_its_matmul_before_the_layers(calls):
    config = build_config({"adapter.method": "qlora"})
    installed = speed.install(_model(), config, _settings(graphs=True, nf4=True), precision=contextlib.nullcontext)
    assert calls == ["bypass", "chunked_loss", "plain_causal_hint", "nf4", "compile"]
    assert installed.notes == [
        "QLoRA: 14 4-bit matmuls compiled with their layers (zerotune.speed.nf4)",
        "compiling 2 decoder layers (torch.compile; the first steps are slow)"]
    assert installed.nf4_matmuls == 14


def test_eager_run_without_graphs_touches_nothing_but_the_loss(calls):
    installed = speed.install(_model(), build_config({}), _settings(compiled=False), precision=contextlib.nullcontext)
    assert calls == ["chunked_loss"]  # no bypass either: nothing wraps or traces the attention
    assert installed.notes == [] and installed.new_graph_breaks() is None


@pytest.mark.parametrize("setting, compiled, device, method, strategy, fused", [
    ("auto", True, "cuda", "lora", "single", True),  # where it was measured
    ("auto", False, "cuda", "lora", "single", False),
    ("auto", True, "cpu", "lora", "single", False),
    ("auto", True, "cuda", "lora", "ddp", False),  # auto stays one process
    ("on", False, "cpu", "lora", "ddp", True),
    ("on", True, "cuda", "lora", "fsdp", False),
    ("on", True, "cuda", "full", "single", False),
    ("off", True, "cuda", "lora", "single", False),
])
def test_fused_projections_decision(setting, compiled, device, method, strategy, fused):
    """The rule is resolve's; install fuses exactly when the settings say so, and says so."""
    from zerotune.resolve import explain_fused_projections

    config = build_config({"adapter.fused_projections": setting, "adapter.method": method})
    decided, why = explain_fused_projections(config, strategy, compiled, device)
    assert decided == fused and why


@pytest.mark.parametrize("fused", [True, False])
def test_install_fuses_as_the_settings_say(calls, fused):
    installed = speed.install(_model(), build_config({}), _settings(compiled=False, fused=fused),
                              precision=contextlib.nullcontext)
    assert ("fused_projections" in calls) == fused and calls[0] == ("bypass" if fused else "chunked_loss")
    assert len([note for note in installed.notes if note.startswith("adapter.fused_projections")]) == fused


def test_step_graphs_need_sdpa_attention(calls):
    auto = speed.install(_model("eager"), build_config({}), _settings(graphs=True), precision=contextlib.nullcontext)
    assert auto.graphs is False
    assert "train.cuda_graph auto: off, the model loaded with eager attention, not SDPA" in auto.notes
    with pytest.raises(ConfigError, match="train.cuda_graph: .*: the model loaded with eager attention, not SDPA; "
                                          "drop --cuda-graph"):
        speed.install(_model("eager"), build_config({"train.cuda_graph": "on"}), _settings(graphs=True),
                      precision=contextlib.nullcontext)


def test_install_on_a_tiny_llama():
    """The real installers: fused projections pass their probe, the chunked loss takes the head."""
    from test_fused_projections import _model as lora_llama

    model = lora_llama("llama")
    installed = speed.install(model, build_config({"adapter.fused_projections": "on"}),
                              _settings(compiled=False, fused=True), precision=contextlib.nullcontext)
    assert isinstance(installed.loss_head, chunked_loss.ChunkedLossHead)
    assert installed.fused_groups == 8 and sum(hasattr(m, "_zerotune_group") for m in model.modules()) == 2 * 7
    assert installed.notes == ["adapter.fused_projections: 8 groups of projections fused (q/k/v, gate/up, o, down)"]


def _tiny_lora_llama():
    from zerotune import adapters
    from zerotune.config import AdapterConfig
    from zerotune.tiny import build_model

    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    model.config.use_cache = False
    return adapters.apply_method(model, AdapterConfig(dropout=0.0), seed=0)


def test_the_plain_causal_hint_is_kept_when_it_computes_the_masked_logits():
    model = _tiny_lora_llama()
    notes = []
    assert speed._plain_causal_hint(model, build_config({}), notes, contextlib.nullcontext) is True
    assert notes == [] and model.config._attn_implementation == plain_causal.NAME


@pytest.mark.parametrize("breakage", ["raises", "wrong"])
def test_the_plain_causal_hint_falls_back_when_attention_cannot_take_a_missing_mask(monkeypatch, breakage):
    """As with Falcon's new decoder layout on transformers 5.17, whose attention added None to its scores: the
    hinted path is probed at install, auto turns step graphs off with a note, on stops before any step."""
    from transformers.integrations import sdpa_attention

    real = sdpa_attention.sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is None and breakage == "raises":
            raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")
        if attention_mask is None:  # a model whose attention computes something else without a mask
            output, weights = real(module, query, key, value, None, **kwargs)
            return output * 0.5, weights
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", attention)
    model, notes = _tiny_lora_llama(), []
    assert speed._plain_causal_hint(model, build_config({}), notes, contextlib.nullcontext) is False
    assert model.config._attn_implementation == "sdpa"  # back to what it loaded with
    assert len(notes) == 1 and notes[0].startswith("train.cuda_graph auto: off, its ")
    assert ("TypeError" in notes[0]) if breakage == "raises" else ("differ from the masked" in notes[0])
    with pytest.raises(ConfigError, match="train.cuda_graph: .*drop --cuda-graph"):
        speed._plain_causal_hint(_tiny_lora_llama(), build_config({"train.cuda_graph": "on"}), [],
                                 contextlib.nullcontext)
