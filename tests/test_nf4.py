"""zerotune.speed.nf4: QLoRA's 4-bit matmul in torch ops (for torch.compile) against bitsandbytes' own, on
bitsandbytes' CPU backend: the dequantized weights bit for bit, a layer's output and input gradient exactly,
and no bitsandbytes op or graph break left in a traced layer."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from zerotune.model import bitsandbytes_runs_4bit_on_cpu  # noqa: E402
from zerotune.speed.nf4 import covered, dequantize_nf4, install_compiled_nf4, matches_bitsandbytes  # noqa: E402

pytestmark = pytest.mark.skipif(not bitsandbytes_runs_4bit_on_cpu(), reason="bitsandbytes has no CPU 4-bit backend")


def nf4_layer(out_features, in_features, dtype=torch.bfloat16, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4", quant_storage=dtype)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=dtype) * 0.05,
                                     requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     quant_storage=dtype, module=layer).to("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, dtype=dtype), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # as zerotune.model.keep_one_4bit_layout
    return layer


def flat_reference(layer, dtype):
    """bitsandbytes' generic (device-independent) dequantization, blocks running over the flattened weight as
    its quantization and CUDA kernel do. Its CPU kernel instead restarts blocks at each row, which gives other
    values when a row's width is not a multiple of the block size (48 columns: twice the rounding error)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    state = layer.weight.quant_state
    absmax = (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(layer.weight.data.view(torch.uint8).reshape(-1), absmax, _get_4bit_code("nf4", "cpu"),
                   state.blocksize, state.shape, dtype)


@pytest.mark.parametrize("shape", [(96, 64), (300, 256), (48, 40), (7, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantized_weight_is_bitsandbytes_bit_for_bit(shape, dtype):
    """Rows a multiple of the block size against bitsandbytes' public dequantize_4bit; more than 256 blocks
    (several nested scales); short last blocks and an odd count of values against its flat reference."""
    state = (layer := nf4_layer(*shape, dtype=dtype)).weight.quant_state
    if shape[1] % state.blocksize == 0:
        expected = bnb.functional.dequantize_4bit(layer.weight.data, state).to(dtype)
    else:
        expected = flat_reference(layer, dtype)
    ours = dequantize_nf4(layer.weight.data, state.absmax, state.state2.code, state.state2.absmax, state.offset,
                          state.code, state.blocksize, state.state2.blocksize, tuple(state.shape), dtype)
    assert covered(layer) == (shape[1] % state.blocksize == 0)  # other widths keep bitsandbytes' forward
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, torch.zeros_like(ours))


def test_layer_output_and_input_gradient_equal_bitsandbytes():
    layer = nf4_layer(80, 64)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 5, 80, dtype=torch.bfloat16)
    expected = layer(x)
    expected.backward(grad)
    expected_grad, x.grad = x.grad.clone(), None
    assert install_compiled_nf4(layer) == 1
    ours = layer(x)
    ours.backward(grad)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)


def test_traced_layer_has_no_bitsandbytes_op_and_no_graph_break():
    """What the compiled decoder layers get: one graph, the dequantization in plain aten ops, same values."""
    layer = nf4_layer(64, 128, bias=False)
    install_compiled_nf4(layer)
    graphs = []

    def backend(graph_module, example_inputs):  # records dynamo's graph, then runs it through AOTAutograd
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer._zerotune_bnb_forward(x)
    expected.backward(grad)
    expected_grad, x.grad = x.grad.clone(), None
    traced = torch.compile(layer, backend=backend, fullgraph=True)
    out = traced(x)
    out.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)
    assert len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if "bitsandbytes" in str(n.target)]


def test_states_it_does_not_reproduce_keep_bitsandbytes_forward():
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="fp4", quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="fp4", quant_storage=torch.bfloat16, module=layer).to("cpu")
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    expected = layer(x)
    assert not covered(layer)
    assert install_compiled_nf4(layer) == 0 and not hasattr(layer, "_zerotune_bnb_forward")
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_qlora_run_with_the_compiled_matmul_equals_bitsandbytes_run(alpaca_file, tmp_path, monkeypatch):
    """zerotune train --method qlora --compile on puts zerotune.speed.nf4 under the decoder layers, and the run's
    per-step losses equal the bitsandbytes run's (fp32 on CPU, 1e-6). The layers' torch.compile is stubbed out
    here (a CPU compile of two QLoRA runs took a minute of CI); the traced-graph test above and the GPU test
    cover compiling it. Llama-3 shapes (GQA), widths a multiple of bitsandbytes' block."""
    import zerotune.speed.compile
    import zerotune.speed.nf4
    from conftest import corpus, make_config
    from helpers import train
    from zerotune.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", corpus(), "llama", vocab_size=300, hidden_size=64, layers=2,
                                heads=4, kv_heads=2, seed=0)
    installed, compiled = [], []
    real = zerotune.speed.nf4.install_compiled_nf4
    monkeypatch.setattr(zerotune.speed.nf4, "install_compiled_nf4",
                        lambda model: installed.append(real(model)) or installed[-1])
    monkeypatch.setattr(zerotune.speed.compile, "compile_layers", lambda model, mode=None: compiled.append(mode) or 2)
    losses = {}
    for nf4 in (True, False):
        config = make_config(model_dir, alpaca_file, tmp_path / f"run-{nf4}", **{
            "adapter.method": "qlora", "model.compile": "on", "model.compiled_nf4": nf4, "train.max_steps": 3})
        losses[nf4] = train(config).losses
    assert installed == [2 * 7] and len(compiled) == 2  # every linear of both layers, in the first run only
    assert losses[True][-1] < losses[True][0]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-6, atol=0)


def test_a_changed_bitsandbytes_layout_keeps_bitsandbytes_matmul(monkeypatch):
    """The install-time check: this bitsandbytes matches; one that reads its packed bytes another way (here:
    the low nibble first) gets no compiled matmul at all."""
    import zerotune.speed.nf4

    assert matches_bitsandbytes(torch.device("cpu"))
    real = bnb.functional.dequantize_4bit

    def low_nibble_first(packed, state, *args, **kwargs):
        raw = packed.view(torch.uint8)
        return real(((raw << 4) | (raw >> 4)).view(packed.dtype), state, *args, **kwargs)

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", low_nibble_first)
    assert not zerotune.speed.nf4.matches_bitsandbytes(torch.device("cpu"))
    layer = nf4_layer(64, 128)
    assert install_compiled_nf4(layer) == 0 and not hasattr(layer, "_zerotune_bnb_forward")
