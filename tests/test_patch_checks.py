"""Speed features that patch a library's internals check that the patch took, and fall back loudly.

Upstream releases move the internals zerotune's fast paths rely on: transformers 5.25 routed attention through
the `kernels` package's dispatch, whose global write broke every compiled checkpointed layer's graph (the
layers quietly ran uncompiled). Each check here is made to fail by simulating such a change."""

import contextlib

import pytest
import torch

from zerotune.speed import fused_check
from zerotune.speed import fused_projections as fp
from zerotune.speed.compile import compile_layers, graph_breaks, new_graph_breaks, without_hub_kernel_dispatch
from zerotune.tiny import build_model


def _llama(checkpointing=False):
    from test_fused_projections import _model

    return _model("llama", checkpointing=checkpointing)


def _logits(model):
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_projections_kept_when_they_compute_what_peft_computes(checkpointing):
    reference, fused = _llama(checkpointing), _llama(checkpointing)
    fused.eval(), reference.eval()
    b_before = [w.detach().clone() for w in fused_check._lora_b_weights(fused)]
    count, why_not = fused_check.install_checked(fused, contextlib.nullcontext)
    assert (count, why_not) == (8, None)
    assert any(hasattr(m, "_zerotune_group") for m in fused.modules())
    torch.testing.assert_close(_logits(fused), _logits(reference), rtol=1e-5, atol=1e-5)
    # the check drew B at random for a while and put the adapters' own B matrices back
    assert all(torch.equal(w, b) for w, b in zip(fused_check._lora_b_weights(fused), b_before))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_projections_fall_back_to_peft_when_an_upstream_change_makes_them_wrong(monkeypatch, checkpointing):
    """As if PEFT changed where a LoRA layer keeps its scaling: the fused q/k/v and gate/up lose the adapters'
    update. The check sees the logits move, puts PEFT's forwards back and says why."""
    reference, fused = _llama(checkpointing), _llama(checkpointing)
    fused.eval(), reference.eval()
    wide = fp._wide_output
    monkeypatch.setattr(fp, "_wide_output", lambda self, group, name, x: wide(self, group, name, x) -
                        torch.nn.functional.linear(x, self._zerotune_fused_weight) * 0.5)
    count, why_not = fused_check.install_checked(fused, contextlib.nullcontext)
    assert count == 0 and "differ from PEFT's" in why_not
    assert not any(hasattr(m, "_zerotune_group") or "_zerotune_qkv_view" in m.__dict__ for m in fused.modules())
    assert fused._zerotune_fused_hooks == []
    torch.testing.assert_close(_logits(fused), _logits(reference), rtol=1e-6, atol=1e-6)


def test_fused_projections_fall_back_when_the_patched_forward_fails(monkeypatch):
    reference, fused = _llama(True), _llama(True)
    fused.eval(), reference.eval()

    def broken(self, *args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'position_embeddings'")

    monkeypatch.setattr(fp, "_qkv_attention_forward", broken)
    count, why_not = fused_check.install_checked(fused, contextlib.nullcontext)
    assert count == 0 and "TypeError" in why_not and "position_embeddings" in why_not
    torch.testing.assert_close(_logits(fused), _logits(reference), rtol=1e-6, atol=1e-6)


def test_hub_kernel_dispatch_is_bypassed_without_changing_the_model():
    """transformers 5.25+ wraps attention forwards in the `kernels` dispatch; zerotune binds the module's own
    forward (same values). On a transformers without it, nothing changes."""
    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0).eval()
    before = _logits(model)
    wrapped = [m for m in model.modules() if getattr(type(m).forward, "__code__", None) is not None
               and type(m).forward.__code__.co_name == "new_forward"]
    changed = without_hub_kernel_dispatch(model)
    assert changed == len(wrapped)
    assert all("forward" in m.__dict__ for m in wrapped)
    assert without_hub_kernel_dispatch(model) == 0  # once only
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_a_graph_break_in_a_compiled_layer_is_reported_in_one_line(monkeypatch):
    """Simulates an upstream change that breaks the compiled layer's graph (a side effect inside it)."""
    from helpers import matmul_counting_compile
    from transformers.models.llama.modeling_llama import LlamaMLP

    monkeypatch.setattr(torch.nn.Module, "compile", matmul_counting_compile([]))
    torch._dynamo.reset()
    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    compile_layers(model)
    before = graph_breaks()
    _logits(model)
    assert new_graph_breaks(before) is None  # the stock layers compile whole

    forward = LlamaMLP.forward

    def with_side_effect(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(LlamaMLP, "forward", with_side_effect)
    torch._dynamo.reset()
    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    compile_layers(model)
    before = graph_breaks()
    _logits(model)
    line = new_graph_breaks(before)
    assert line is not None and "\n" not in line and "graph break" in line and "--compile off" in line
