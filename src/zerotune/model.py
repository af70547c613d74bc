"""Load a causal LM and its tokenizer: dtype, attention kernel, checkpointing, quantization.

No distributed code lives here; strategies place and wrap the model afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from zerotune.config import ModelConfig
from zerotune.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_model_source(config: ModelConfig):
    """Read the model's config.json (no weights) so a bad id fails before anything heavy happens."""
    from transformers import AutoConfig

    name = config.name
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{local}: not a Hugging Face model directory (no config.json); check --model")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name,
                                          trust_remote_code=config.trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ConfigError(
                f"model {name!r} needs its own code from the hub; pass --trust-remote-code only if you trust it"
            ) from None
        raise ConfigError(f"model {name!r}: {str(error).splitlines()[0]}") from None
    except OSError:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ConfigError(
            f"model {name!r} is not a local directory and cannot be reached on the hub"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}; download it once or pass a local model directory"
        ) from None


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.name, trust_remote_code=config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model {config.name!r}: the tokenizer has no EOS token, so the model cannot learn to stop")
    if tokenizer.pad_token_id is None:
        # Labels are built explicitly, so pad == eos does not hide the EOS label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, method: str, device: torch.device, dtype: torch.dtype, on_meta: bool = False,
               partitioned: bool = False, attention: str | None = None):
    """Load the base model onto ``device``. QLoRA loads 4-bit NF4 weights through bitsandbytes.
    ``on_meta``: parameters on the meta device (no memory; the engine materialises its shards and loads them),
    buffers such as rotary frequencies computed for real. ``partitioned``: the caller has switched on
    transformers' ZeRO-3 loading, which partitions parameters as they are created; they stay where it put them.
    ``attention``: as resolved (zerotune.resolve); None resolves model.attn_implementation here."""
    from transformers import AutoModelForCausalLM

    from zerotune.resolve import explain_attention

    kwargs = dict(
        dtype=dtype,
        attn_implementation=attention or explain_attention(config.attn_implementation, device.type)[0],
        trust_remote_code=config.trust_remote_code,
    )
    if on_meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(check_model_source(config), **kwargs)
    elif config.init == "random" and method == "qlora":
        model = random_4bit_model(check_model_source(config), kwargs, device, dtype)
    elif config.init == "random":
        model_config = check_model_source(config)
        with torch.device(device):  # initialised in place: a 7B model takes seconds on a GPU, not minutes
            model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    else:
        stays_on_host = False
        if method == "qlora":
            kwargs["quantization_config"] = qlora_quantization_config(dtype, device.type)
            # transformers quantizes only exact nn.Linear layers; subclasses (Falcon's FalconLinear) load in
            # full precision: keep them on the host and quantize them onto the device below, one at a time
            stays_on_host = has_linear_subclasses(check_model_source(config), config.trust_remote_code)
        if device.type == "cuda" and not partitioned:  # straight from the (memory-mapped) files to this GPU
            kwargs["device_map"] = {"": "cpu" if stays_on_host else device}
        model = AutoModelForCausalLM.from_pretrained(config.name, **kwargs)
    if method != "qlora" and not on_meta and not partitioned:
        model.to(device)
    if method == "qlora":
        quantize_linears(model, device, dtype, lambda child: child.weight.data)
        if any(t.device.type != device.type for t in [*model.parameters(), *model.buffers()]):
            model.to(device)  # the embeddings, norms and head of a model that loaded on the host
        keep_one_4bit_layout(model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpoint_every_nth_layer(model, config.checkpoint_every)
    # from_pretrained returns eval mode, and transformers only checkpoints in train mode.
    model.train()
    return model


def compute_precision(config: ModelConfig, model: torch.nn.Module, device: torch.device, cache: bool = True):
    """The context the forward runs in: autocast to the weights' dtype when they are 16-bit and
    ``model.mixed_precision`` is on, so fp32 adapter weights do not force fp32 matmuls. ``cache=False`` keeps
    autocast from caching casts across calls (inside a captured CUDA graph)."""
    from contextlib import nullcontext

    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    if not config.mixed_precision or dtype not in (torch.bfloat16, torch.float16):
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, found by transformers' own `_no_split_modules` class names."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def checkpoint_every_nth_layer(model: torch.nn.Module, every: int) -> int:
    """Keep gradient checkpointing on decoder layers 0, N, 2N, ... and switch it off on the rest, which then
    store their activations (transformers checkpoints per layer, by each layer's own flag). Returns how many
    layers recompute."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def has_linear_subclasses(model_config, trust_remote_code: bool = False) -> bool:
    """Whether the architecture builds linear layers of an nn.Linear subclass (Falcon's FalconLinear), which
    transformers' bitsandbytes loading leaves unquantized. Checked on the meta device: nothing allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return any(isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear for m in model.modules())


def quantize_linears(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, weight_of) -> int:
    """Replace every linear layer but the output head that is not 4-bit yet by a bitsandbytes NF4 layer on
    ``device`` (double quantization, compute and storage ``dtype``), one at a time: ``weight_of(child)`` gives
    its full-precision weight, which is packed before the next is made. Used for random weights, and for the
    layers transformers leaves unquantized because they subclass nn.Linear (all of Falcon's: transformers
    converts ``type(m) is nn.Linear`` only, so a Falcon "QLoRA" would otherwise train at full precision).
    Returns how many layers were quantized here."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, bnb.nn.Linear4bit) or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=dtype, device="meta")
            weight = weight_of(child).to(device=device, dtype=dtype)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=dtype, module=layer).to(device)
            if child.bias is not None:
                bias = child.bias.data if child.bias.device.type != "meta" else torch.zeros(child.out_features)
                layer.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
            setattr(parent, name, layer)
            count += 1
    return count


def keep_one_4bit_layout(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first
    time the layer runs in eval mode without gradients (our evaluation pass). The repacked layer then takes
    that kernel on every later call, training included, with bf16 block scales. Widths that are not a multiple
    of 32 fail outright. Switched off per layer, so evaluation and training use the same weights and the same
    path. GPUs never repack."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bitsandbytes_runs_4bit_on_cpu() -> bool:
    """Whether the installed bitsandbytes quantizes and dequantizes NF4 on the CPU (0.50 does, through its
    CPU backend; older releases are CUDA-only). A 64x64 round trip, checked for sense, not just for running."""
    try:
        import bitsandbytes.functional as bnb_functional

        weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
        error = (bnb_functional.dequantize_4bit(packed, state) - weight).abs().mean()
        return bool(error < 0.2 * weight.abs().mean())
    except Exception:
        return False


def qlora_quantization_config(compute_dtype: torch.dtype, device_type: str = "cuda"):
    """NF4 + double quantization with ``compute_dtype`` compute and storage; on CPU only where the installed
    bitsandbytes runs 4-bit there (checked before any model loads)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("adapter.method qlora needs bitsandbytes: pip install 'zerotune[qlora]' (or use --method "
                          "lora)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("adapter.method qlora: no CUDA GPU here; pass --use-cpu for bitsandbytes' CPU backend, "
                          "or use --method lora")
    if device_type == "cpu" and not bitsandbytes_runs_4bit_on_cpu():
        raise ConfigError("adapter.method qlora on CPU: the installed bitsandbytes cannot run 4-bit on the CPU "
                          "(0.50 or newer can: pip install -U bitsandbytes); on CPU use --method lora, or run on a "
                          "CUDA GPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,  # lets FSDP and ZeRO-3 shard the packed weights
    )


def random_4bit_model(model_config, kwargs: dict, device: torch.device, dtype: torch.dtype):
    """An architecture with random weights, quantized as QLoRA loads real ones, without the bf16 model ever
    existing whole: built on the meta device, then each linear layer (all but the output head) gets a random
    bf16 weight on the GPU that bitsandbytes packs to NF4 (double quantization, storage in ``dtype``) before
    the next one is drawn. Peak memory is the 4-bit model plus one bf16 matrix, so a 70B architecture
    builds on one 80 GB GPU with no weight files (benchmarks; a real run loads pretrained weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    qlora_quantization_config(dtype, device.type)  # the same checks: bitsandbytes, and 4-bit on this device
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    std = getattr(model_config, "initializer_range", 0.02)
    quantize_linears(model, device, dtype,
                     lambda child: torch.empty(child.out_features, child.in_features, dtype=dtype,
                                               device=device).normal_(0, std))
    for module in model.modules():  # embeddings, norms, the head: real tensors, initialised as transformers does
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            if param.dim() > 1:
                value.normal_(0, std)
            else:
                value.fill_(0.0 if name == "bias" else 1.0)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    if getattr(model_config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
    model.is_loaded_in_4bit = True  # what PEFT and transformers look for on a 4-bit model
    return model


def training_state_bytes(config) -> int:
    """Weights plus fp32 gradients, master copies and Adam moments of the trainable part, per replica.
    Counts parameters on the meta device, so nothing is allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(config.model.name, trust_remote_code=config.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    weight_bytes = 0.5 if config.adapter.method == "qlora" else DTYPES.get(config.model.dtype, torch.bfloat16).itemsize
    if config.adapter.method == "full":
        trainable = total
    else:  # a LoRA adapter is about r * (in + out) per adapted matrix: under 2% of the weights at r=16
        trainable = int(total * 0.02 * config.adapter.r / 16)
    return int(total * weight_bytes + trainable * 16)
