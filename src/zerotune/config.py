"""The one schema for a run: YAML files, CLI flags and ``key=value`` overrides all land here.

Each section is a small dataclass. Every field carries its CLI flag and a help text in its metadata, so
``--help``, the YAML reference in the README and validation all come from this file.
Precedence, lowest to highest: defaults, YAML, flags, dotted overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from zerotune.errors import ConfigError
from zerotune.ranges import Interval


def option(default: Any, help: str, flag: str | None = None, valid: str | None = None, **kwargs: Any) -> Any:
    """A config field with its help text, (optionally) its CLI flag and, for a number, its valid range in interval
    notation ("[0, 1)", "[1, inf)"; every int and float field declares one, and floats must be finite)."""
    metadata = {"help": help, "flag": flag, "valid": Interval.parse(valid) if valid else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name: str = option("meta-llama/Llama-2-7b-hf", "Hub id or local Hugging Face model directory.", "--model")
    init: Literal["pretrained", "random"] = option(
        "pretrained", "pretrained: load the model's weights. random: the architecture from its config.json with "
                      "random weights, built on the device (benchmarks and smoke tests; nothing is downloaded).",
        "--init",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Weight and compute dtype. auto: bf16 on GPUs that support it, fp32 on CPU.", "--dtype"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = option(
        "auto", "Attention kernel. auto: flash_attention_2 when installed on a GPU, else sdpa.", "--attn-implementation"
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: less memory, about 30% more compute.",
        "--gradient-checkpointing",
    )
    checkpoint_every: int = option(
        1, "With --gradient-checkpointing: recompute only every N-th decoder layer (1: all of them). The others "
           "keep their activations: less recompute, more memory, in between the two; `zerotune plan` shows both.",
        "--checkpoint-every", valid="[1, inf)",
    )
    compile: Literal["auto", "on", "off"] = option(
        "auto", "torch.compile each decoder layer (regional compilation): inductor fuses RMSNorm, RoPE, SwiGLU "
                "and PEFT's scale-and-add into Triton kernels (tiled over rows and columns: +2.7% on W2), and "
                "the chunked loss's per-chunk softmax and "
                "gradient (no fp32 copy of the logits). About 2x the eager step on a 7B LoRA after a "
                "~1 minute warm-up compile; numerics within 1e-4 of eager in our tests. auto: on for CUDA GPUs "
                "(one process, DDP, FSDP2, DeepSpeed ZeRO-1/2), off on CPU (CPU compiles take minutes and rarely "
                "pay back in a short run) and under ZeRO-3, where on is refused (DeepSpeed's parameter hooks "
                "inside the compiled layers make them recompile past torch.compile's limit).", "--compile",
    )
    compiled_nf4: bool = option(
        True, "With --method qlora and compiled layers in one process: the 4-bit matmul is written in torch ops and "
              "compiled with its layer (zerotune.speed.nf4), one fused dequantize kernel per weight instead of "
              "bitsandbytes' per-call host code; same values bit for bit. A 7B QLoRA micro-batch-1 step is "
              "host-bound, and took 0.26 s instead of 0.38 s on an H200. Not yet under DDP, FSDP2 or DeepSpeed "
              "(untested there). --no-compiled-nf4: bitsandbytes' own matmul.", "--compiled-nf4",
    )
    mixed_precision: bool = option(
        True, "With a bf16/fp16 model, run the forward under torch.autocast in that dtype: the fp32 LoRA weights "
              "(PEFT keeps adapters in fp32) then multiply on tensor cores, while their master copies, gradients "
              "and optimizer stay fp32. --no-mixed-precision: fp32 LoRA matmuls (about 25% of a 7B LoRA step "
              "on an H200). No effect on fp32 models, nor under DeepSpeed, whose bf16/fp16 section sets the "
              "precision (its engine turns autocast off inside).", "--mixed-precision",
    )
    chunked_loss: bool = option(
        True, "Cross-entropy from the last hidden states in chunks, with its gradient computed on the fly: full "
              "fp32 logits never exist (saves ~1 GiB per 2048 tokens at a 32k vocabulary, ~4 GiB at 128k). "
              "--no-chunked-loss: the model's logits, then cross-entropy.", "--chunked-loss",
    )
    trust_remote_code: bool = option(
        False, "Allow model code from the hub to run. Off unless you trust the model's repository.",
        "--trust-remote-code",
    )


@dataclass
class AdapterConfig:
    """What trains: LoRA adapters, QLoRA (4-bit base) or every weight."""

    method: Literal["lora", "qlora", "full"] = option(
        "lora", "lora, qlora (4-bit NF4 base through bitsandbytes: GPU, or CPU with bitsandbytes >= 0.50) or full.",
        "--method")
    r: int = option(16, "LoRA rank.", "--lora-r", valid="[1, inf)")
    alpha: int = option(32, "LoRA alpha; the update is scaled by alpha / r.", "--lora-alpha", valid="[1, inf)")
    dropout: float = option(0.05, "Dropout on the LoRA input.", "--lora-dropout", valid="[0, 1)")
    target_modules: list[str] = option(
        ["all-linear"],
        "Module names to adapt. all-linear adapts every linear layer but the output head "
        "(Llama's q_proj..down_proj, Falcon's query_key_value..dense_4h_to_h).",
        "--lora-target-modules",
    )
    fused_projections: Literal["auto", "on", "off"] = option(
        "auto", "Run sibling projections that read one input (q/k/v, gate/up) as one matmul, with the LoRA "
                "matrices stacked into the frozen weights (zerotune/speed/fused_projections.py): for q/k/v and gate/up "
                "the B matrices as extra columns, so the adapters' update is summed inside the frozen "
                "matmul; for o and down the A matrices as extra rows. One backward matmul gives the input's "
                "gradient through the frozen weights and the adapters. In Llama-style MLPs gate/up's output stays "
                "whole and SwiGLU's backward is one Triton kernel (--swiglu-kernel). Same "
                "adapter files, same values as PEFT's "
                "path (tested to 1e-6 in fp32); eager it keeps for the backward what PEFT's path keeps plus o's "
                "and down's small B matrices. "
                "Covers LoRA on bf16/fp32 bases in one process, and under DDP with on (tested on CPU workers, "
                "not measured on GPUs); in layers with gradient checkpointing gate/up, "
                "o and down as custom ops a compiled checkpoint recomputes (W1-ckpt +1.9% tokens/s and 1.1 GiB "
                "less peak memory), and q/k/v through a wrapped attention forward (Llama, Mistral, Qwen2, Qwen3; "
                "W1-ckpt +2.0% more for 0.1 GiB); with LoRA dropout "
                "only the frozen matmuls are fused (each adapter keeps its own mask); elsewhere PEFT's path runs "
                "and the log says why. On an H200: fusing the siblings +2.5-2.8% tokens/s on W1 and W2, stacking "
                "A +1.6-1.8% on top, B in columns +1.9% (W1) and +0.4% (W2) on top, gate/up as views +0.6% and "
                "the stacked weights padded to a multiple of 64 +0.8-1.1% on top "
                "(benchmarks/results/*-variants-*.json). auto: on where covered with compiled layers on a CUDA "
                "GPU in one process (where it was measured); on: wherever covered, eager and CPU too. A bare --fused-projections means on.",
        "--fused-projections",
    )
    swiglu_kernel: bool = option(
        True, "Where fused projections run gate/up stacked in a Llama-style MLP (Llama, Mistral, Qwen2, Qwen3): "
              "gate/up's output stays one tensor and SwiGLU's backward is one Triton kernel on CUDA GPUs "
              "(zerotune/speed/swiglu.py; the same formula in torch ops elsewhere), which writes gate/up's gradient "
              "whole. On an H200 the kernel ran at 3.8 TB/s against 3.0 for inductor's, and W2 1.5-2.1% faster "
              "(benchmarks/results/*-swiglu-*.json). In layers with gradient checkpointing gate/up still run "
              "stacked but SwiGLU runs as torch ops (inductor's kernel, which the checkpoint recomputes). "
              "--no-swiglu-kernel: inductor's kernel, compiled from the MLP's own forward (and, under "
              "checkpointing, gate/up unfused).", "--swiglu-kernel",
    )


@dataclass
class DataConfig:
    """Training and evaluation data."""

    path: str = option("", "Local .json, .jsonl or .parquet file, a directory written by datasets' save_to_disk, or "
                           "a hub dataset id. Empty: the bundled English+Spanish sample (a demo set, not real "
                           "training data).", "--data")
    template: Literal["auto", "alpaca", "alpaca_es", "chat", "tokens"] = option(
        "auto", "Prompt template. auto: tokens for pre-tokenized records ('input_ids', optional 'labels' with "
                "-100 for tokens not to learn), chat for records with 'messages', else alpaca.", "--template"
    )
    eval_path: str = option("", "Separate evaluation file. Empty: hold out eval_fraction of the data.", "--eval-data")
    eval_fraction: float = option(0.05, "Fraction held out for evaluation when no eval file is given.", "--eval-fraction",
                                  valid="[0, 1)")
    max_seq_len: int = option(1024, "Longest tokenized example, prompt and response together.", "--max-seq-len",
                              valid="[2, inf)")  # one token to read, one to predict
    overlong: Literal["truncate", "drop"] = option(
        "truncate", "What to do with examples longer than max_seq_len.", "--overlong"
    )
    split: str = option("train", "Split to read from a hub dataset or a saved DatasetDict.", "--split")
    packing: bool = option(
        False, "Pack several training examples into each row of max_seq_len tokens. Attention stays within each "
               "example (position ids restart per example; transformers then masks per example), and each "
               "example's loss equals its unpacked loss. Cuts padding on short data.", "--packing",
    )


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = option(0, "Optimizer steps to run. 0: run for `epochs` epochs.", "--max-steps", valid="[0, inf)")
    epochs: float = option(1.0, "Epochs over the training data when max_steps is 0.", "--epochs", valid="[0, inf)")
    batch_size: int = option(4, "Micro-batch size per worker (examples per forward pass).", "--batch-size",
                             valid="[1, inf)")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", "--grad-accum", valid="[1, inf)")
    lr: float = option(2e-4, "Peak learning rate.", "--lr", valid="(0, inf)")
    weight_decay: float = option(0.0, "AdamW weight decay.", "--weight-decay", valid="[0, inf)")
    warmup_steps: int = option(0, "Linear warmup steps before the schedule starts.", "--warmup-steps", valid="[0, inf)")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate decay after warmup.", "--schedule")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value; 0 disables clipping.", "--max-grad-norm",
                                  valid="[0, inf)")
    seed: int = option(42, "Seed for weights of new LoRA layers, data order and dropout.", "--seed",
                       valid="[0, 4294967295]")  # 32 bits, as every generator accepts
    cuda_graph: Literal["auto", "on", "off"] = option(
        "auto", "Replay each training step as one CUDA graph (zerotune.speed.step_graphs): the host launches one graph "
                "instead of thousands of kernels, so host-bound steps run at the GPU's pace (on an H200: 7B QLoRA "
                "micro-batch 1 2.58x the HF path instead of 2.07x, W1 +14-20%; no gain where the GPU is the "
                "bottleneck, ~0.1 GiB more peak memory). Same losses as op by op (tested on GPU with dropout and "
                "checkpointing). Batches are padded to data.max_seq_len. auto: on for LoRA/QLoRA with one CUDA "
                "worker, compiled layers and SDPA attention when every batch has that length anyway (--packing, or "
                "all examples max_seq_len long); off otherwise. on: the same needs, with full fine-tuning and "
                "unpacked data too (a one-line error where a need is missing). A bare --cuda-graph means on.",
        "--cuda-graph")
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end).", "--eval-every", valid="[0, inf)")
    log_every: int = option(1, "Log training metrics every N steps.", "--log-every", valid="[1, inf)")
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "A NaN/Inf loss or gradient norm: stop names the step and exits; skip drops that step (no update) "
                "and stops after max_skipped_steps such steps. No checkpoint ever holds non-finite values.",
        "--on-nonfinite",
    )
    max_skipped_steps: int = option(5, "With on_nonfinite skip: stop once this many steps were skipped.",
                                    "--max-skipped-steps", valid="[1, inf)")


@dataclass
class DistributedConfig:
    """How many workers and which engine."""

    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = option(
        "auto", "Engine. auto: single for one worker; DDP for several unless the model needs sharding.", "--strategy"
    )
    zero_stage: int = option(3, "DeepSpeed ZeRO stage (1, 2 or 3).", "--zero-stage", valid="[1, 3]")
    offload: Literal["none", "optimizer", "params", "all"] = option(
        "none", "DeepSpeed CPU offload: optimizer states, parameters, or both.", "--offload"
    )
    zero3_fetch: Literal["layer", "module"] = option(
        "layer", "ZeRO-3: gather parameters a decoder layer at a time (one hook and one all-gather per layer, "
                 "DeepSpeed's leaf modules) or a module at a time (DeepSpeed's default: a hook per linear layer, "
                 "slow in Python for LoRA). A --deepspeed JSON that sets zero_optimization.leaf_module keeps its "
                 "own.", "--zero3-fetch"
    )
    deepspeed_config: str = option(
        "", "A DeepSpeed JSON, used as-is; its \"auto\" values are filled from this config.", "--deepspeed"
    )
    launcher: Literal["auto", "local", "ray"] = option(
        "auto", "How workers start. auto: ray when --ray-address is set, else local processes.", "--launcher"
    )
    num_workers: int = option(1, "Worker processes (one per GPU, or CPU workers with --use-cpu).", "--num-workers",
                              valid="[1, inf)")
    use_cpu: bool = option(False, "Train on CPU workers (gloo) even if GPUs exist.", "--use-cpu")
    no_deepspeed: bool = option(
        False, "Never use DeepSpeed (the original tutorial's flag): DDP, or FSDP if asked.", "--no-deepspeed"
    )
    sharded_loading: bool = option(
        False, "Never hold the whole model on one worker while loading. FSDP2: build it on the meta device, shard "
               "it, then let each worker read only its own rows of every weight from the safetensors files (LoRA A "
               "is drawn after sharding: same distribution, another draw than the default path). DeepSpeed ZeRO-3: "
               "transformers builds it inside deepspeed.zero.Init (partitioned as created) and copies the weights "
               "in one module at a time. With --init random nothing is read: FSDP2 draws each weight from one seeded "
               "generator on every worker and keeps its rows (the same model for any worker count); ZeRO-3 "
               "initialises each module inside zero.Init. Not for QLoRA.", "--sharded-loading",
    )
    ray_address: str = option("", "Ray cluster address; 'auto' joins the running cluster. Empty: start a local Ray.",
                              "--ray-address")
    max_failures: int = option(0, "Ray launcher: restart the workers up to N times after a worker or node dies; "
                                  "they resume from the latest checkpoint. -1: without limit.", "--max-failures",
                               valid="[-1, inf)")
    max_restarts: int = option(0, "Local launcher: restart all workers up to N times after one fails; they "
                                  "resume from the latest checkpoint.", "--max-restarts", valid="[0, inf)")


@dataclass
class CheckpointConfig:
    """Checkpoints and resume: everything needed to continue a run exactly where it stopped."""

    save_steps: int = option(0, "Write a checkpoint every N optimizer steps (0: no step-based checkpoints).",
                             "--save-steps", valid="[0, inf)")
    save_minutes: float = option(0.0, "Write a checkpoint when this many minutes passed since the last one "
                                      "(0: no time-based checkpoints).", "--save-minutes",
                               valid="[0, inf)")
    keep: int = option(2, "Keep the newest K complete checkpoints; older ones are deleted.", "--keep-checkpoints",
                       valid="[1, inf)")
    resume: bool = option(False, "Continue the run in --output-dir from its newest complete checkpoint.",
                          "--resume")


@dataclass
class TrackingConfig:
    """Where metrics go."""

    backend: Literal["mlflow", "none"] = option(
        "mlflow", "mlflow logs params, metrics and artifacts; none writes only metrics.jsonl and loss.png.", "--tracking"
    )
    uri: str = option(
        "", "MLflow tracking URI, e.g. http://127.0.0.1:5000. Empty: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory.", "--tracking-uri"
    )
    experiment: str = option("zerotune", "MLflow experiment name.", "--experiment")
    required: bool = option(False, "Stop at start (exit 2) when the MLflow store does not answer; without it "
                                   "training goes on with metrics.jsonl and loss.png only.", "--require-tracking")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = option("runs/zerotune", "Output directory for the adapter or model, metrics and plots.", "--output-dir")
    overwrite: bool = option(False, "Replace an output directory that already holds a run.", "--overwrite")


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


SECTIONS: dict[str, type] = _section_types()


def field_specs() -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field as (dotted key, Field, type annotation)."""
    specs = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            specs.append((f"{section}.{f.name}", f, hints[f.name]))
    return specs


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against ``annotation``; convert strings from the command line. Raises ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML reads a bare on/off as a bool
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(key, v, args[0]) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _flatten(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested YAML mapping -> {'section.field': value}, naming unknown keys."""
    flat: dict[str, Any] = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return _flatten(tree, str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['train.lr=1e-4', ...]`` -> {'train.lr': '1e-4'}; values are typed later by coerce()."""
    flat = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        flat[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return flat


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Apply flat {'section.key': value} layers over the defaults, checking every key and type."""
    specs = {key: annotation for key, _, annotation in field_specs()}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in specs:
                section = key.split(".")[0]
                if section in SECTIONS:
                    known = ", ".join(k.split(".", 1)[1] for k in specs if k.startswith(section + "."))
                    raise ConfigError(f"unknown config key {key!r} (section {section} has: {known})")
                raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(SECTIONS)})")
            merged[key] = coerce(key, value, specs[key])
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in merged.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    config = RunConfig(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    validate(config)
    return config


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict()`` output (e.g. a config.yaml written by a run)."""
    return build_config(_flatten(tree, "config"))


def uses_deepspeed(config: RunConfig) -> bool:
    """DeepSpeed is asked for by name, or by a JSON under --strategy auto (unless --no-deepspeed)."""
    d = config.distributed
    return d.strategy == "deepspeed" or (d.strategy == "auto" and bool(d.deepspeed_config) and not d.no_deepspeed)


def compile_enabled(model: ModelConfig, device_type: str, strategy: str, zero3: bool = False) -> bool:
    """model.compile auto: on for CUDA GPUs under one process, DDP, FSDP2 and DeepSpeed ZeRO-1/2 (where it was
    measured); off on CPU and under ZeRO-3. There DeepSpeed fetches each module's parameters in hooks that run
    inside a compiled layer: torch.compile traces them and recompiles past its limit, so the run is right but
    slower than eager, and ``on`` is refused (check_compile_allowed)."""
    check_compile_allowed(model, zero3)
    return model.compile == "on" or (model.compile == "auto" and device_type == "cuda" and not zero3)


def check_compile_allowed(model: ModelConfig, zero3: bool) -> None:
    """A ConfigError for --compile on under ZeRO-3 (see compile_enabled); preflight calls it before any worker."""
    if zero3 and model.compile == "on":
        raise ConfigError("model.compile: on does not work under DeepSpeed ZeRO-3 (its per-module parameter hooks "
                          "run inside the compiled layers, which then recompile past torch.compile's limit); drop "
                          "--compile, or use --zero-stage 2 or --strategy fsdp")


def check_ranges(config: RunConfig) -> None:
    """Every number against the range its field declares (``valid``), so YAML, flags and overrides share one
    check; the message names the YAML key, the range, the value and the flag."""
    if config.distributed.zero_stage not in (1, 2, 3):
        raise ConfigError(f"distributed.zero_stage: ZeRO has stages 1, 2 and 3, got {config.distributed.zero_stage} "
                          "(flag --zero-stage)")
    for key, spec, _ in field_specs():
        section, name = key.split(".")
        value, interval = getattr(getattr(config, section), name), spec.metadata.get("valid")
        problem = interval.problem(value) if interval else None
        if problem:
            flag = f" (flag {spec.metadata['flag']})" if spec.metadata.get("flag") else ""
            raise ConfigError(f"{key}: {problem}{flag}")


def validate(config: RunConfig) -> None:
    """The declared ranges, then checks across fields that types and ranges alone cannot express."""
    check_ranges(config)
    if not config.adapter.target_modules:
        raise ConfigError("adapter.target_modules: name at least one module, or all-linear (--lora-target-modules)")
    if config.model.checkpoint_every > 1 and not config.model.gradient_checkpointing:
        raise ConfigError("model.checkpoint_every: picks which layers --gradient-checkpointing recomputes; add "
                          "--gradient-checkpointing or drop --checkpoint-every")
    if config.train.max_steps == 0 and config.train.epochs <= 0:
        raise ConfigError("train.epochs: must be more than 0 when train.max_steps is 0 (--epochs or --max-steps)")
    if config.distributed.no_deepspeed and config.distributed.strategy == "deepspeed":
        raise ConfigError("distributed.strategy: 'deepspeed' contradicts --no-deepspeed; pick one")
    if config.checkpoint.resume and config.output.overwrite:
        raise ConfigError("checkpoint.resume and output.overwrite contradict: --resume continues the run in "
                          "--output-dir, --overwrite deletes it; pick one")
    if config.train.on_nonfinite == "skip" and uses_deepspeed(config):
        raise ConfigError("train.on_nonfinite: skip is not available with DeepSpeed (its engine applies a reduced "
                          "step and cannot drop it); use stop, or another --strategy")
    if config.distributed.sharded_loading and (not (config.distributed.strategy == "fsdp" or uses_deepspeed(config))
                                               or config.adapter.method == "qlora"):
        raise ConfigError("distributed.sharded_loading needs --strategy fsdp or DeepSpeed ZeRO-3 and --method lora "
                          "or full (QLoRA quantizes while loading)")
    if config.train.cuda_graph == "on":
        if config.distributed.num_workers != 1 or config.distributed.use_cpu:
            raise ConfigError("train.cuda_graph: needs one worker on a CUDA GPU; drop --cuda-graph, or "
                              "--num-workers/--use-cpu")
        if config.model.compile == "off":
            raise ConfigError("train.cuda_graph: needs compiled layers; drop --compile off or --cuda-graph")
        if config.model.attn_implementation not in ("auto", "sdpa"):
            raise ConfigError(f"train.cuda_graph: needs --attn-implementation sdpa (or auto), got "
                              f"{config.model.attn_implementation}")


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
