"""adapter.fused_projections: sibling projections (q/k/v, gate/up) as one matmul each way. Same values as
PEFT's path, the same adapter files, and the compiled layer really holds fewer matmuls."""

import functools
import importlib.util

import pytest
import torch

from helpers import random_adapters
from zerotune import adapters
from zerotune.config import AdapterConfig
import zerotune.speed.fused_projections as fp
from zerotune.speed.fused_projections import install_fused_projections
from zerotune.tiny import build_model

IDS = torch.arange(3, 35).reshape(2, 16)


def _model(architecture="llama", dropout=0.0, layers=2, checkpointing=False):
    """Grouped-query attention (k/v narrower than q); random nonzero adapters so the updates count."""
    model = build_model(architecture, 300, hidden_size=64, layers=layers, heads=4, kv_heads=2, seed=0)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return random_adapters(adapters.apply_method(model, AdapterConfig(dropout=dropout), seed=0))


@pytest.fixture
def stacked_calls(monkeypatch):
    """The stacked weight's dtype for every stacked matmul the fused model runs."""

    calls = []
    for function in (fp._StackedLinear, fp._WideLinear):  # LoRA-A in rows; LoRA-B in columns
        monkeypatch.setattr(function, "apply", functools.partial(
            lambda real, *args: calls.append(args[1].dtype) or real(*args), function.apply))
    return calls


def _run(model):
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: biased q/k/v
def test_fused_siblings_give_peft_values_and_keep_the_state_dict(architecture):
    reference, fused = _model(architecture), _model(architecture)
    assert install_fused_projections(fused) == 2 * 4  # q/k/v, gate/up, o and down in each layer
    logits, grads = _run(reference)
    fused_logits, fused_grads = _run(fused)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    state, fused_state = reference.state_dict(), fused.state_dict()
    assert fused_state.keys() == state.keys()  # the fused weight is a non-persistent buffer
    for key, value in state.items():
        torch.testing.assert_close(fused_state[key], value, rtol=0, atol=0, msg=key)
    layer = fused.base_model.model.model.layers[0].self_attn
    views = [getattr(layer, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj")]
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # the base weights are not stored twice


def test_a_sibling_called_alone_or_out_of_order_gets_its_own_output():
    """Only the first call of a group computes; a lone or reordered call still gets its own columns, and after
    an adapter changes, the next forward (the holder's pre-hook clears the memo) uses the new weights."""
    reference, fused = _model(), _model()
    install_fused_projections(fused)
    x = torch.randn(2, 5, 64)
    ours = fused.base_model.model.model.layers[0].self_attn
    theirs = reference.base_model.model.model.layers[0].self_attn
    for name in ("v_proj", "q_proj", "k_proj", "k_proj"):
        torch.testing.assert_close(getattr(ours, name)(x), getattr(theirs, name)(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for model in (fused, reference):
            model.base_model.model.model.layers[0].self_attn.k_proj.lora_B["default"].weight.add_(1.0)
            model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.mul_(-2.0)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-6,
                                   atol=1e-6)


def test_moving_the_model_after_fusing_keeps_peft_values(stacked_calls):
    """``model.to(...)`` after fusing converts the stacked weight with the rest (a buffer): the stacked path
    still runs, in the new dtype, and the values hold."""
    reference, fused = _model(), _model()
    install_fused_projections(fused)
    reference, fused = reference.to(torch.float64), fused.to(torch.float64)
    logits, grads = _run(reference)
    fused_logits, fused_grads = _run(fused)
    assert stacked_calls == [torch.float64] * 2 * 4
    torch.testing.assert_close(fused_logits, logits, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_stacked_weights_are_padded_with_zeros_that_stay_zero():
    """The stacked dimension is padded to a multiple of PAD_TO (odd sizes ran slower on the GPU); the padding
    holds zeros through refreshes after the adapters change, and the values stay PEFT's (the other tests)."""

    fused = _model(layers=1)
    install_fused_projections(fused)
    groups = [m._zerotune_group for m in fused.modules() if getattr(m, "_zerotune_index", None) == 0]
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    _run(fused)
    for group in groups:
        extent = group.stacked.shape[1] if group.columns else group.stacked.shape[0]
        assert extent % fp.PAD_TO == 0 and group.padding > 0  # 64 features or rows + ranks of 16 here
        padding = group.stacked[:, extent - group.padding:] if group.columns else group.stacked[extent - group.padding:]
        assert padding.abs().max() == 0


def test_parts_are_copied_only_where_kept_apart_and_the_backward_runs_no_addmm():
    """No full-size copies that only cost memory traffic: q/k/v's outputs are separate tensors (attention keeps
    v alone); a Llama MLP runs gate/up's output whole through zerotune.speed.swiglu (its backward one op writing
    [gate | up]'s gradient) and never calls gate_proj and up_proj apart; with swiglu=False (--no-swiglu-kernel,
    and MLP classes outside SWIGLU_MLPS) gate and up are views of the group's one output (a gated MLP keeps
    both for its backward anyway); and the backward sums x's gradient through A instead of running addmm, which
    into a new tensor first copies its strided input there (on the GPU, inductor keeps a bf16 addmm as it is)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func)
            return func(*args, **(kwargs or {}))

    for swiglu in (True, False):
        fused = _model(layers=1)
        install_fused_projections(fused, swiglu=swiglu)
        layer = fused.base_model.model.model.layers[0]
        outputs = {}
        for name, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
        loss = fused(input_ids=IDS, labels=IDS).loss
        storage = {name: out.untyped_storage().data_ptr() for name, out in outputs.items()}
        assert len({storage[name] for name in ("q_proj", "k_proj", "v_proj")}) == 3
        if swiglu:
            assert "gate_proj" not in storage and "up_proj" not in storage
        else:
            assert storage["gate_proj"] == storage["up_proj"]
        with Ops() as ops:
            loss.backward()
        assert torch.ops.aten.mm.default in ops.seen and torch.ops.aten.addmm.default not in ops.seen
        assert (torch.ops.zerotune.swiglu_backward.default in ops.seen) == swiglu


@pytest.mark.slow  # compiled layers on CPU
def test_compiled_layer_holds_each_fused_matmul_once(monkeypatch):
    """Counted in the compiled graphs (AOTAutograd with inductor's partitioner): per layer the forward has 8
    matmuls instead of 21 (7 projections x base, A, B; fused: per group two, for q/k/v and gate/up x A^T and
    the stacked matmul with B in its columns, for o and down the stacked matmul with A in its rows and LoRA-B)
    and the backward 16 instead of 35 (per group four: through the stacked weight, x's gradient through A or
    LoRA-B's, A's and B's); 4 layers compile one graph (two: the first layer's input needs no gradient), no
    recompilation per layer. Compiled, the stacked copies of A and B are refreshed by the model's pre-hook:
    after the adapters change (as an optimizer step changes them), the next forward and gradients follow."""
    from helpers import matmul_counting_compile
    from zerotune.speed.compile import compile_layers

    counts = []
    monkeypatch.setattr(torch.nn.Module, "compile", matmul_counting_compile(counts))
    reference, fused = _model(layers=4), _model(layers=4)
    install_fused_projections(fused)
    expected, _ = _run(reference)
    torch._dynamo.reset()
    compile_layers(fused)
    logits, _ = _run(fused)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert sorted(counts) == [("bw", 15), ("bw", 16), ("fw", 8), ("fw", 8)]

    for model in (reference, fused):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.grad = None
                if "lora_" in name:
                    p.mul_(-1.5)
    expected, grads = _run(reference)
    logits, fused_grads = _run(fused)
    # fp32 summation order: the adapters' update is summed inside the matmul, and now a larger one
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _saved_for_backward(model) -> int:
    """Bytes of the storages a forward keeps for the backward (views count their whole storage, which they
    keep alive), parameters and buffers left out."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(size for pointer, size in storages.items() if pointer not in held)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiled on CPU: slow
def test_fused_groups_keep_no_more_for_the_backward_than_pefts_path(monkeypatch, compiled):
    """Peak memory: eager, the fused model keeps for the backward exactly what PEFT's path keeps plus o's and
    down's block-diagonal LoRA-B matrices (rank x out; q/k/v and gate/up hold B in their stacked weight).
    Compiled, the partitioner may also keep its own copy of a q/k/v or gate/up input where PEFT's recomputes it
    (one per layer here; on an H200 the peak was unchanged). Earlier versions kept whole group outputs alive
    through one saved part (v_proj's columns, or x A^T as a view of the stacked matmul's output): 0.7-4.6 GiB
    more on an H200 W2 step; this test fails on the parts as views, eager and compiled."""
    from helpers import matmul_counting_compile
    from zerotune.speed.compile import compile_layers

    reference, fused = _model(), _model()
    install_fused_projections(fused)
    if compiled:
        monkeypatch.setattr(torch.nn.Module, "compile", matmul_counting_compile([]))
        torch._dynamo.reset()
        compile_layers(reference)
        compile_layers(fused)
    groups = [m._zerotune_group for m in fused.modules() if getattr(m, "_zerotune_index", None) == 0]
    assert sorted(g.columns for g in groups) == [False] * 4 + [True] * 4
    allowed = sum(4 * g.frozen_rows * g.rank for g in groups if not g.columns)  # fp32
    if compiled:
        allowed += sum(4 * IDS.numel() * g.in_features for g in groups if g.columns)
    assert _saved_for_backward(fused) <= _saved_for_backward(reference) + allowed


@pytest.mark.slow  # inductor on CPU
def test_inductor_compiled_stacked_layers_follow_pefts_values_across_updates():
    """The real compiler (inductor, on CPU): two steps with the adapters updated in between give PEFT's eager
    logits and gradients; the stacked A rows, refreshed by the model's pre-hook outside the compiled layers,
    follow the update."""
    from zerotune.speed.compile import compile_layers

    reference, fused = _model(), _model()
    install_fused_projections(fused)
    torch._dynamo.reset()
    compile_layers(fused)
    for _ in range(2):
        logits, grads = _run(reference)
        fused_logits, fused_grads = _run(fused)
        torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            for model in (reference, fused):
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        p.sub_(0.5 * p.grad)
                        p.grad = None


def test_with_dropout_only_the_frozen_matmul_is_fused_and_the_masks_are_pefts(monkeypatch):
    """Each sibling's adapter keeps its own dropout mask: with the same seed, the fused group draws PEFT's masks
    in PEFT's order, so logits and every gradient equal PEFT's. Compiled, the forward holds one frozen matmul
    per group (18 matmuls per layer instead of 21: the adapters' 14 stay), and its graphs, traced and
    partitioned as inductor's are and run as traced, draw the same masks and give eager PEFT's values."""
    from helpers import matmul_counting_compile
    from zerotune.speed.compile import compile_layers

    reference, fused = _model(dropout=0.3), _model(dropout=0.3)
    assert install_fused_projections(fused) == 2 * 4
    torch.manual_seed(7)
    logits, grads = _run(reference)
    torch.manual_seed(7)
    fused_logits, fused_grads = _run(fused)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(8)
    assert not torch.allclose(_run(fused)[0], fused_logits)  # the masks are live: another seed, other logits

    counts = []
    monkeypatch.setattr(torch.nn.Module, "compile", matmul_counting_compile(counts))
    torch._dynamo.reset()
    compile_layers(fused)
    for model in (fused, reference):
        for p in model.parameters():
            p.grad = None
    torch.manual_seed(7)
    compiled_logits, compiled_grads = _run(fused)
    assert sorted(c for c in counts if c[0] == "fw") == [("fw", 18), ("fw", 18)]
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_stacked_matmul_under_bf16_autocast_and_where_it_does_not_apply(stacked_calls):
    """Under autocast to the frozen weights' dtype (bf16 on CPU here) the stacked matmul runs and gives PEFT's
    autocast values to bf16 rounding; a bf16 base with fp32 adapters and no autocast (PEFT computes the
    adapters in fp32 there) keeps the unstacked path, which gives PEFT's values to fp32 rounding."""
    reference, fused = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    for model in (reference, fused):  # PEFT's fp32 adapters on a bf16 base, as apply_method leaves them
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    install_fused_projections(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = _run(reference)
        fused_logits, fused_grads = _run(fused)
    assert stacked_calls == [torch.bfloat16] * 2 * 4
    torch.testing.assert_close(fused_logits, logits, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)
    stacked_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=1e-6, atol=1e-6)
    assert stacked_calls == []


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: biased q/k/v
def test_checkpointed_layers_fuse_every_group_without_a_memo(monkeypatch, architecture):
    """Under gradient checkpointing no group keeps state between calls (a compiled checkpoint cannot hold the
    memo's Python state): q/k/v are computed whole by the wrapped attention forward, gate/up by the replaced MLP
    forward, o and down in their own calls; all run as custom ops (a compiled checkpoint on torch 2.11 kept
    everything an autograd.Function saved), SwiGLU as torch ops. Eager and compiled (the checkpoint inside the
    compiled layer) the logits and every gradient equal checkpointed PEFT's. Compiled, the backward recomputes
    only what PEFT's recomputes: q/k/v, gate/up and o (the norm after it reads its output) but not down's frozen
    matmul, whose x A^T comes from its own rank-wide matmul; no graph break, the memo never written. Without
    the replaced MLP forward (--no-swiglu-kernel) gate/up keep PEFT's forward."""
    from helpers import op_counting_compile
    from zerotune.speed.compile import compile_layers

    reference, fused = _model(architecture, checkpointing=True), _model(architecture, checkpointing=True)
    assert install_fused_projections(fused) == 2 * 4
    unswiglued = _model(architecture, checkpointing=True)
    assert install_fused_projections(unswiglued, swiglu=False) == 2 * 3  # q/k/v, o and down
    # an attention class outside QKV_ATTENTIONS (the benchmarks' A/B baseline): q/k/v keep PEFT's forward
    unwrapped = _model(architecture, checkpointing=True)
    with monkeypatch.context() as patch:
        patch.setattr(fp, "QKV_ATTENTIONS", set())
        assert install_fused_projections(unwrapped) == 2 * 3  # gate/up, o and down
    assert not any(hasattr(m, "_zerotune_qkv_view") or hasattr(m.q_proj, "_zerotune_group")
                   for m in unwrapped.modules() if hasattr(m, "q_proj"))
    groups = [m._zerotune_group for m in fused.modules() if getattr(m, "_zerotune_index", None) == 0]
    assert sorted(len(g.members) for g in groups) == [1, 1, 1, 1, 2, 2, 3, 3] and not any(g.keeps_memo for g in groups)
    writes = []
    monkeypatch.setattr(fp._Group, "__setattr__", lambda self, key, value: writes.append(key) if key == "memo"
                        else object.__setattr__(self, key, value))
    logits, grads = _run(reference)
    graphs = []
    for compiled in (False, True):
        if compiled:
            monkeypatch.setattr(torch.nn.Module, "compile", op_counting_compile(graphs))
            torch._dynamo.reset()
            compile_layers(fused)
        for p in fused.parameters():
            p.grad = None
        fused_logits, fused_grads = _run(fused)
        torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert writes == []
    # one graph for both layers: forward, q/k/v's 9 PEFT matmuls and o's and down's x A^T, then the custom ops
    (kind, forward), (_, backward) = graphs
    # one graph for both layers: forward, o's and down's x A^T, then the custom ops (q/k/v's and gate/up's
    # x A^T are inside wide_linear)
    (kind, forward), (_, backward) = graphs
    assert kind == "fw" and forward == {"mm": 2, "lora_linear": 2, "wide_linear": 2}
    # backward: o's and down's x A^T recomputed, four gradient matmuls per group; recomputed custom ops: q/k/v's
    # and gate/up's wide_linear and o's lora_linear (not down's)
    assert backward == {"mm": 2 + 4 * 4, "lora_linear": 1, "wide_linear": 2}


def test_wrapped_attention_forward_takes_its_input_either_way_and_follows_train_and_eval(monkeypatch):
    """The checkpointed layer's wrapped attention forward (q/k/v stacked) given its input by position or by name,
    in training and in eval mode (its view of the module follows model.eval()), gives PEFT's attention output."""
    reference, fused = _model(checkpointing=True), _model(checkpointing=True)
    install_fused_projections(fused)
    stacked = []
    monkeypatch.setattr(fp, "_wide_output", lambda *args, real=fp._wide_output: stacked.append(args[3].shape)
                        or real(*args))
    hidden = torch.randn(2, 16, 64)
    cos_sin = reference.base_model.model.model.rotary_emb(hidden, torch.arange(16)[None].expand(2, -1))
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(fused, mode)()
        attention, peft_attention = (m.base_model.model.model.layers[1].self_attn for m in (fused, reference))
        assert attention._zerotune_qkv_view.training == (mode == "train")
        expected = peft_attention(hidden, cos_sin, None)[0]
        stacked.clear()
        torch.testing.assert_close(attention(hidden, cos_sin, None)[0], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attention(hidden_states=hidden, position_embeddings=cos_sin, attention_mask=None)[0],
                                   expected, rtol=1e-6, atol=1e-6)
        assert stacked == [hidden.shape] * 2


def test_training_under_checkpointing_with_fused_projections_equals_peft(config_for, tmp_path, capsys):
    """The training loop with gradient checkpointing: fused (q/k/v, gate/up, o, down per layer) and PEFT's path
    give the same losses."""
    from helpers import train

    settings = {"train.max_steps": 3, "adapter.dropout": 0.0, "model.gradient_checkpointing": True}
    plain = train(config_for(**settings, **{"output.dir": str(tmp_path / "plain")}))
    fused = train(config_for(**settings, **{"output.dir": str(tmp_path / "fused"), "adapter.fused_projections": "on"}))
    assert "adapter.fused_projections: 8 groups of projections fused" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0)


def test_uncovered_layers_keep_pefts_path(tiny_llama):
    if importlib.util.find_spec("bitsandbytes"):
        from zerotune.config import ModelConfig
        from zerotune.model import load_model

        quantized = load_model(ModelConfig(name=str(tiny_llama)), "qlora", torch.device("cpu"), torch.float32)
        assert install_fused_projections(adapters.apply_method(quantized, AdapterConfig(method="qlora",
                                                                                        dropout=0.0), seed=0)) == 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_with_fused_projections_equals_peft_and_saves_the_same_adapter(config_for, tmp_path, capsys,
                                                                               dropout, monkeypatch):
    """Also: without dropout the MLPs run zerotune.speed.swiglu, and --no-swiglu-kernel (adapter.swiglu_kernel) gives
    the same losses through the MLP's own forward."""
    from helpers import adapter_weights, train

    swiglu_calls = []
    monkeypatch.setattr(fp, "silu_mul", lambda x, real=fp.silu_mul: swiglu_calls.append(x.shape) or real(x))
    settings = {"train.max_steps": 3, "adapter.dropout": dropout}
    plain = train(config_for(**settings, **{"output.dir": str(tmp_path / "plain")}))
    assert "groups of projections fused" not in capsys.readouterr().out  # auto: on CUDA with compiled layers only
    fused = train(config_for(**settings, **{"output.dir": str(tmp_path / "fused"), "adapter.fused_projections": "on"}))
    assert "adapter.fused_projections: 8 groups of projections fused" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0)
    assert bool(swiglu_calls) == (dropout == 0)  # with dropout the MLP's own forward (gate/up unstacked)
    if dropout == 0:
        swiglu_calls.clear()
        own = train(config_for(**settings, **{"output.dir": str(tmp_path / "own"), "adapter.fused_projections": "on",
                                              "adapter.swiglu_kernel": False}))
        assert not swiglu_calls
        torch.testing.assert_close(torch.tensor(own.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0)
    ours, reference = adapter_weights(tmp_path / "fused"), adapter_weights(tmp_path / "plain")
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-3, atol=1e-5, msg=key)  # Adam: as test_compile
