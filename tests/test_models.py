"""Model loading details: LoRA targets per family, checkpointing really on, trust_remote_code refusal."""

import importlib.util
import json

import pytest
import torch

from conftest import corpus, make_config
from helpers import adapter_weights, train
from zerotune.config import ModelConfig
from zerotune.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_falcon(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "falcon", corpus(), "falcon", vocab_size=300,
                           hidden_size=32, layers=2, heads=4, seed=0)


def test_falcon_fused_qkv_is_adapted_by_default(tiny_falcon, alpaca_file, tmp_path):
    result = train(make_config(tiny_falcon, alpaca_file, tmp_path / "run", **{"train.max_steps": 3}))
    modules = {key.split(".lora_")[0].split(".")[-1] for key in adapter_weights(tmp_path / "run")}
    assert modules == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert result.losses[-1] < result.losses[0]


def test_llama_default_targets_every_linear_but_the_head(config_for):
    config = config_for(**{"train.max_steps": 1})
    train(config)
    modules = {key.split(".lora_")[0].split(".")[-1] for key in adapter_weights(config.output.dir)}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gradient_checkpointing_is_really_active(tiny_llama):
    """from_pretrained returns eval mode and transformers checkpoints only in train mode: load_model must
    leave the model training, with checkpointing on."""
    import torch

    from zerotune.model import load_model

    model = load_model(ModelConfig(name=str(tiny_llama), gradient_checkpointing=True), "lora",
                       torch.device("cpu"), torch.float32)
    assert model.training and model.is_gradient_checkpointing
    layer = model.model.layers[0]
    assert layer.training and getattr(layer, "gradient_checkpointing", True)


@pytest.mark.parametrize("every, recomputed", [(1, [True, True]), (2, [True, False]), (None, [False, False])])
def test_checkpoint_every_recomputes_exactly_the_chosen_layers(tiny_llama, every, recomputed):
    """--checkpoint-every N: layers 0, N, 2N, ... run their forward a second time in the backward pass (the
    recompute), the others once; gradients are the same either way (fp32: the recompute is exact)."""
    from zerotune.model import load_model

    settings = dict(gradient_checkpointing=True, checkpoint_every=every) if every else {}
    model = load_model(ModelConfig(name=str(tiny_llama), **settings), "lora", torch.device("cpu"), torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    calls = [0] * len(model.model.layers)

    def counting(index, forward):
        def counted(*args, **kwargs):
            calls[index] += 1
            return forward(*args, **kwargs)
        return counted

    for index, layer in enumerate(model.model.layers):  # mlp runs inside the layer's checkpointed forward
        layer.mlp.forward = counting(index, layer.mlp.forward)  # (module hooks do not fire in the recompute)
    ids = torch.arange(3, 19).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2 if again else 1 for again in recomputed]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain = load_model(ModelConfig(name=str(tiny_llama)), "lora", torch.device("cpu"), torch.float32)
    for p in plain.parameters():
        p.requires_grad_(True)
    plain(input_ids=ids, labels=ids).loss.backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_every_needs_checkpointing():
    from zerotune.config import build_config
    from zerotune.errors import ConfigError

    with pytest.raises(ConfigError, match="model.checkpoint_every: picks which layers --gradient-checkpointing"):
        build_config({"model.checkpoint_every": 2})
    with pytest.raises(ConfigError, match="model.checkpoint_every: must be at least 1"):
        build_config({"model.checkpoint_every": 0, "model.gradient_checkpointing": True})


def test_remote_code_model_is_refused(tmp_path):
    from zerotune.errors import ConfigError
    from zerotune.model import check_model_source

    directory = tmp_path / "custom"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "zerotune-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        check_model_source(ModelConfig(name=str(directory)))


FAMILIES = {
    "llama3_gqa": ("llama", {"kv_heads": 2}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}),
    "falcon_new_layout": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2},
                          {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "falcon_old_layout": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True},
                          {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "mistral": ("mistral", {"kv_heads": 2}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}),
    "qwen2": ("qwen2", {"kv_heads": 2}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"}),
}


def eval_loss_of(model, config) -> float:
    """Token-weighted eval loss of ``model`` over the run's eval split, batched as the run batched it."""
    import torch

    from zerotune.data.batches import collate, eval_batches
    from zerotune.data.prepare import prepare_data
    from zerotune.model import load_tokenizer
    from zerotune.step import token_loss_sum

    tokenizer = load_tokenizer(config.model)
    examples = prepare_data(config.data, tokenizer, config.train.seed).eval
    total, tokens = torch.zeros(()), 0
    with torch.no_grad():
        for indices in eval_batches(len(examples), config.train.batch_size, 0, 1):
            loss_sum, count = token_loss_sum(model, collate([examples[i] for i in indices], tokenizer.pad_token_id))
            total, tokens = total + loss_sum, tokens + int(count)
    return float(total / tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_reloads_in_plain_peft(family, alpaca_file, tmp_path):
    """Train, save the adapter, reload it with plain transformers + PEFT: the eval loss the run measured on
    its last step equals the reloaded model's (1e-5), and the adapted modules are the family's linears."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    architecture, extra, expected_targets = FAMILIES[family]
    model_dir = save_tiny_model(tmp_path / family, corpus(), architecture, vocab_size=300, hidden_size=32, layers=2,
                                heads=4, seed=0, **extra)
    config = make_config(model_dir, alpaca_file, tmp_path / "run", **{"data.eval_fraction": 0.2,
                                                                     "train.max_steps": 2})
    result = train(config)
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    targets = {name.rsplit(".", 1)[-1] for name in saved}
    assert targets == expected_targets
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(eval_loss_of(model, config), result.eval_losses[-1], rtol=1e-5, atol=0)


def test_random_init_is_reproducible_and_not_the_saved_weights(config_for, tiny_llama, tmp_path):
    """model.init random: the architecture of config.json with seeded random weights, built on the device."""
    from zerotune.model import load_model

    def random_model(seed):
        torch.manual_seed(seed)
        return load_model(ModelConfig(name=str(tiny_llama), dtype="fp32", init="random"), "lora",
                          torch.device("cpu"), torch.float32).state_dict()

    saved = load_model(ModelConfig(name=str(tiny_llama), dtype="fp32"), "lora", torch.device("cpu"),
                       torch.float32).state_dict()
    # the tiny model was saved right after building it under manual_seed(0): the same draw
    same_seed, other_seed = random_model(0), random_model(1)
    assert same_seed.keys() == saved.keys() == other_seed.keys()
    assert all(torch.equal(same_seed[k], saved[k]) for k in saved)
    assert not torch.equal(other_seed["model.layers.0.self_attn.q_proj.weight"],
                           saved["model.layers.0.self_attn.q_proj.weight"])
    a = train(config_for(**{"model.init": "random", "output.dir": str(tmp_path / "a")}))
    b = train(config_for(**{"model.init": "random", "output.dir": str(tmp_path / "b")}))
    assert a.losses == b.losses and len(a.losses) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_layer_fetch_names_every_decoder_layer_but_the_first(family, tmp_path):
    """--zero3-fetch layer hands DeepSpeed the decoder layers as leaf modules, by name in the PEFT model that
    DeepSpeed wraps: all of them but the first (whose input needs no gradient), for every family."""
    from transformers import AutoModelForCausalLM

    from zerotune import adapters
    from zerotune.config import AdapterConfig
    from zerotune.strategies.deepspeed import layer_fetch_names

    architecture, extra, _ = FAMILIES[family]
    model_dir = save_tiny_model(tmp_path / family, corpus(), architecture, vocab_size=300, hidden_size=32, layers=3,
                                heads=4, seed=0, **extra)
    model = adapters.apply_method(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(), seed=0)
    names = layer_fetch_names(model)
    modules = dict(model.named_modules())
    layer_class = {"llama": "LlamaDecoderLayer", "falcon": "FalconDecoderLayer", "mistral": "MistralDecoderLayer",
                   "qwen2": "Qwen2DecoderLayer"}[architecture]
    assert [type(modules[name]).__name__ for name in names] == [layer_class] * 2
    assert [name.rsplit(".", 1)[-1] for name in names] == ["1", "2"]


@pytest.mark.skipif(not importlib.util.find_spec("bitsandbytes"), reason="bitsandbytes is part of zerotune[all]")
@pytest.mark.parametrize("family", ["llama3_gqa", "falcon_new_layout"])
def test_qlora_trains_on_cpu_and_reloads_in_plain_peft(family, alpaca_file, tmp_path):
    """--method qlora on bitsandbytes' CPU backend: every adapted linear is NF4, the loss falls, and plain
    transformers (BitsAndBytesConfig) + PEFT reloading the adapter measure the run's last eval loss (1e-5)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zerotune.model import keep_one_4bit_layout, qlora_quantization_config, quantize_linears

    architecture, extra, expected_targets = FAMILIES[family]
    model_dir = save_tiny_model(tmp_path / family, corpus(), architecture, vocab_size=300, hidden_size=32, layers=2,
                                heads=4, seed=0, **extra)
    config = make_config(model_dir, alpaca_file, tmp_path / "run", **{
        "adapter.method": "qlora", "data.eval_fraction": 0.2, "train.max_steps": 4, "train.eval_every": 4})
    result = train(config)
    assert result.losses[-1] < result.losses[0]
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in saved} == expected_targets
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                quantization_config=qlora_quantization_config(torch.float32, "cpu"))
    # transformers quantizes exact nn.Linear layers only: Falcon's FalconLinear layers stay fp32 there, and
    # zerotune quantizes them itself (without that, Falcon "QLoRA" trained a full-precision base)
    left_to_us = quantize_linears(base, torch.device("cpu"), torch.float32, lambda child: child.weight.data)
    assert left_to_us == (2 * len(expected_targets) if architecture == "falcon" else 0)
    assert sum(type(m).__name__ == "Linear4bit" for m in base.modules()) == 2 * len(expected_targets)
    keep_one_4bit_layout(base)  # as the run did: no CPU inference repack (it fails at these tiny widths)
    model = PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(eval_loss_of(model, config), result.eval_losses[-1], rtol=1e-5, atol=0)
