"""--compile (torch.compile per decoder layer) against eager: per-step losses within 1e-4 relative (fp32,
CPU inductor kernels reorder reductions), and the adapter within 1e-3 relative / 1e-5 absolute."""

import importlib.util

import pytest
import torch

from helpers import adapter_weights, matmul_counting_compile, train

pytestmark = pytest.mark.slow


def test_compiled_layers_match_eager(config_for, tmp_path):
    settings = {"train.max_steps": 3, "train.batch_size": 2}
    eager = train(config_for(**settings, **{"output.dir": str(tmp_path / "eager")}))
    compiled = train(config_for(**settings, **{"output.dir": str(tmp_path / "compiled"), "model.compile": "on"}))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=0)
    left, right = adapter_weights(tmp_path / "compiled"), adapter_weights(tmp_path / "eager")
    for key in right:
        torch.testing.assert_close(left[key], right[key], rtol=1e-3, atol=1e-5)


def test_layers_compile_with_tiled_pointwise_kernels_unless_a_mode_is_given(monkeypatch):
    """compile_layers hands inductor speed.compile.LAYER_COMPILE_OPTIONS (pointwise kernels tiled over rows and columns:
    +2.7% on the H200's W2 step); torch.compile takes a mode or options, so a mode goes alone."""
    from zerotune.speed.compile import LAYER_COMPILE_OPTIONS, compile_layers
    from zerotune.tiny import build_model

    model = build_model("llama", 300, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    assert compile_layers(model) == len(calls) == 2
    assert LAYER_COMPILE_OPTIONS == {"triton.prefer_nd_tiling": True}
    assert all(call == {"options": LAYER_COMPILE_OPTIONS} for call in calls)
    calls.clear()
    compile_layers(model, "max-autotune-no-cudagraphs")
    assert calls and all(call == {"mode": "max-autotune-no-cudagraphs"} for call in calls)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpoint_moves_inside_the_compiled_layer_and_skips_the_last_projection(tiny_llama, monkeypatch,
                                                                                   checkpointing):
    """transformers 5.17 checkpoints around a layer's __call__, outside its compiled call, so the whole
    compiled forward ran again. compile_layers moves the checkpoint into forward (as later transformers do):
    the compiler then recomputes in the backward graph only what it reads, which leaves out down_proj's base
    and LoRA-B matmuls. Simulated here with a layer class of the earlier layout; gradients equal eager. Layers
    with 4-bit weights or dropout keep the earlier layout."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from zerotune import adapters
    from zerotune.config import AdapterConfig, ModelConfig
    from zerotune.model import load_model
    from zerotune.speed.compile import checkpoint_in_forward, compile_layers

    EarlierLayout = earlier_layout()

    def build(layout, dropout=0.0):
        model = load_model(ModelConfig(name=str(tiny_llama), gradient_checkpointing=checkpointing), "lora",
                           torch.device("cpu"), torch.float32)
        for layer in model.model.layers:
            layer.__class__ = layout
        return adapters.apply_method(model, AdapterConfig(dropout=dropout), seed=0)

    ids = torch.arange(3, 19).reshape(2, 8)

    def grads(model):
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    eager = grads(build(EarlierLayout))
    counts: list = []
    monkeypatch.setattr(torch.nn.Module, "compile", matmul_counting_compile(counts))
    model = build(EarlierLayout)
    layers = model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [checkpointing] * len(layers)
    assert compile_layers(model) == len(layers)
    assert not any(layer.gradient_checkpointing for layer in layers)  # moved: __call__ passes through
    assert checkpoint_in_forward(layers[0]) is False  # once moved, a layer is left alone
    compiled = grads(model)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    forward = max(n for kind, n in counts if kind == "fw")
    backward = max(n for kind, n in counts if kind == "bw")
    assert forward == 21  # 7 projections: base, LoRA A, LoRA B
    # the backward: 7 base + 28 LoRA matmuls, and with checkpointing the recomputed forward less down_proj's two
    assert backward == (35 + forward - 2 if checkpointing else 35)
    plain = build(LlamaDecoderLayer)
    assert checkpoint_in_forward(plain.base_model.model.model.layers[0]) is False  # the later layout: untouched
    dropped = build(EarlierLayout, dropout=0.1).base_model.model.model.layers[0]  # random draws: left alone
    assert checkpoint_in_forward(dropped) is False and dropped.gradient_checkpointing == checkpointing
    if checkpointing and importlib.util.find_spec("bitsandbytes"):  # 4-bit layers keep the checkpoint outside
        quantized = load_model(ModelConfig(name=str(tiny_llama), gradient_checkpointing=True), "qlora",
                               torch.device("cpu"), torch.float32)
        layer = quantized.model.layers[0]
        layer.__class__ = EarlierLayout
        assert checkpoint_in_forward(layer) is False and layer.gradient_checkpointing


@pytest.mark.parametrize("path", ["eager", "compiled", "compiled-moved", "control-fresh-masks"])
def test_dropout_gradients_under_checkpointing_are_the_forwards(tiny_llama, path):
    """Checkpointed layers with LoRA dropout: the backward's recomputation must redraw the forward's masks, or
    the gradient belongs to another forward. Checked against central differences of forwards drawing the same
    masks, eager and compiled (the compiler replays saved generator states): with transformers' own layout
    (5.24 checkpoints inside forward) and with the earlier one moved there (move_checkpoint_into_forward, which
    checkpoint_in_forward does not do for dropout layers yet). The control recomputes with fresh masks and must
    disagree."""
    import functools

    from helpers import dropout_gradient_check, dropout_model
    from zerotune.speed.compile import compile_layers, move_checkpoint_into_forward

    model = dropout_model(tiny_llama)
    if path == "compiled-moved":
        for layer in model.base_model.model.model.layers:
            layer.__class__ = earlier_layout()
            move_checkpoint_into_forward(layer)
        compile_layers(model)
    elif path == "compiled":
        compile_layers(model)
    elif path == "control-fresh-masks":
        for layer in model.base_model.model.model.layers:
            layer._gradient_checkpointing_func = functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False)
    along, difference = dropout_gradient_check(model, torch.arange(3, 35).reshape(2, 16))
    error = abs(along - difference) / abs(difference)
    if path == "control-fresh-masks":
        assert error > 0.05
    else:  # the model's RMSNorm computes in fp32: differences are good to ~1e-4 here
        assert error < 5e-3


def earlier_layout():
    """Llama's decoder layer as transformers 5.17 checkpoints it: around ``__call__``, outside the compiled
    call (5.24 checkpoints inside ``forward``)."""
    import functools

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class EarlierLayout(LlamaDecoderLayer):
        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

    EarlierLayout.__name__ = "LlamaDecoderLayer"  # how decoder_layers finds the layers
    return EarlierLayout
