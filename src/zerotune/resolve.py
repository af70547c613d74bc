"""Every "auto" setting and every rule that turns a setting on or off, applied once, before any worker starts.

``resolve(config, machine)`` runs in the launching process (``zerotune.launchers.launch``; also ``zerotune plan``
and ``zerotune train --dry-run``). It returns ``Settings``: the decided values the workers use, and one row per
decision saying what was asked, what was decided and why. The table is logged, written to ``resolved.yaml``
beside ``config.yaml`` (which stays the user's config, for --resume's comparison) and handed to the workers.

What the machine is (``Machine``) is read once, by the launcher; the rules here never ask torch, so tests give
them any machine (a GPU host answers a test the same as a CPU one).

A speed feature that patches a library's internals is still checked when it is installed on the loaded model
(zerotune.speed.install): a decided "on" there means "on if the install-time check passes", and the run's log
says when it did not.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

from zerotune.config import RunConfig
from zerotune.errors import ConfigError


@dataclass(frozen=True)
class Machine:
    """The accelerator the workers run on: its kind, and for CUDA the GPU's name, memory, bf16 support and
    count per host."""

    device_type: str = "cpu"
    gpu_name: str | None = None
    gpu_memory_bytes: int = 0
    gpus_per_host: int = 0
    bf16: bool = False

    @classmethod
    def of(cls, device) -> "Machine":
        """The machine as torch sees it for ``device`` (a torch.device, or None for the CPU)."""
        if device is None or device.type != "cuda":
            return cls(device_type="cpu" if device is None else device.type)
        import torch

        return cls("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory,
                   torch.cuda.device_count(), torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class Decision:
    """One row of the table: the setting (its YAML key, or a name for a rule no key controls), what the config
    asked for, what was decided, and why."""

    key: str
    asked: str
    decided: str
    why: str


@dataclass(frozen=True)
class Settings:
    """The resolved settings the workers run with (no "auto" left), and the decisions that produced them."""

    launcher: str  # inprocess | local | ray
    device_type: str  # cpu | cuda
    strategy: str  # single | ddp | fsdp | deepspeed
    zero_stage: int | None  # DeepSpeed's ZeRO stage; None for the other engines
    dtype: str  # bf16 | fp16 | fp32: the weights as loaded
    attention: str  # sdpa | eager | flash_attention_2
    compile: bool  # decoder layers compiled
    fused_projections: bool  # if its install-time check passes
    cuda_graph: bool  # if the plain-causal check passes
    compiled_nf4: bool  # QLoRA's 4-bit matmul compiled with its layer
    chunked_loss: bool = False  # the output head's chunked loss or log-probs, if the model's head is plain linear
    decisions: tuple[Decision, ...] = field(default=())

    @property
    def zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3

    def table(self) -> str:
        """The decisions as aligned text, one row each."""
        width = max((len(d.key) for d in self.decisions), default=0)
        lines = [f"{'setting':<{width}}  {'asked':<6}  decided: why"]
        lines += [f"{d.key:<{width}}  {d.asked:<6}  {d.decided}: {d.why}" for d in self.decisions]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data for resolved.yaml and for the workers (through pickling launchers and Ray)."""
        tree = asdict(self)
        tree["decisions"] = [asdict(d) for d in self.decisions]
        return tree

    @classmethod
    def from_dict(cls, tree: dict) -> "Settings":
        values = dict(tree)
        values["decisions"] = tuple(Decision(**d) for d in values.get("decisions", ()))
        return cls(**values)


def resolve(config: RunConfig, machine: Machine, world_size: int | None = None,
            fixed_shapes: Callable[[], bool | None] = lambda: None) -> Settings:
    """Apply every rule, in dependency order. ``world_size``: the workers (default: distributed.num_workers);
    ``fixed_shapes``: asked only where the step-graph rule needs it, whether every batch has one shape (packing, or
    every tokenized example at data.max_seq_len); None when unknown (a plan without data). Raises ConfigError
    where an "on" meets a missing need."""
    rows: list[Decision] = []

    def decide(key: str, asked, decided, why: str):
        rows.append(Decision(key, _text(asked), _text(decided), why))
        return decided

    world_size = world_size or config.distributed.num_workers
    d = config.distributed
    launcher = decide("distributed.launcher", d.launcher, *explain_launcher(config))
    device_type = decide("device", "", machine.device_type, _device_reason(config, machine))
    strategy = decide("distributed.strategy", d.strategy, *explain_strategy(config, world_size, machine))
    zero_stage = None
    if strategy == "deepspeed":
        zero_stage = decide("distributed.zero_stage", d.zero_stage, *_explain_zero_stage(config))
        if zero_stage == 3:
            decide("distributed.zero3_fetch", d.zero3_fetch, *_explain_zero3_fetch(config))
    zero3 = strategy == "deepspeed" and zero_stage == 3
    dtype = decide("model.dtype", config.model.dtype, *explain_dtype(config.model.dtype, machine))
    decide("model.mixed_precision", config.model.mixed_precision, *_explain_mixed_precision(config, strategy, dtype))
    attention = decide("model.attn_implementation", config.model.attn_implementation,
                       *explain_attention(config.model.attn_implementation, device_type))
    compiled = decide("model.compile", config.model.compile, *explain_compile(config.model.compile, device_type, zero3))
    if config.model.gradient_checkpointing and compiled:
        decide("gradient checkpoint placement", "", *_explain_checkpoint_placement(config))
    fused = decide("adapter.fused_projections", config.adapter.fused_projections,
                   *explain_fused_projections(config, strategy, compiled, device_type))
    graphs = decide("train.cuda_graph", config.train.cuda_graph,
                    *explain_cuda_graph(config, device_type=device_type, strategy=strategy, compiled=compiled,
                                        attention=attention, fixed_shapes=fixed_shapes))
    nf4 = False
    if config.adapter.method == "qlora":
        nf4 = decide("model.compiled_nf4", config.model.compiled_nf4, *_explain_compiled_nf4(config, strategy, compiled))
    chunked = decide("model.chunked_loss", config.model.chunked_loss,
                     *explain_chunked_loss(config, strategy))
    if config.data.packing and config.objective.name != "sft":
        decide("data.packing", True, True, f"--objective {config.objective.name}: each micro-batch's chosen and "
               "rejected sequences packed into rows of data.max_seq_len, one segment each (same pairs per step)")
    return Settings(launcher=launcher, device_type=device_type, strategy=strategy, zero_stage=zero_stage,
                    dtype=dtype, attention=attention, compile=compiled, fused_projections=fused, cuda_graph=graphs,
                    compiled_nf4=nf4, chunked_loss=chunked, decisions=tuple(rows))


def _text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _device_reason(config: RunConfig, machine: Machine) -> str:
    if machine.device_type == "cuda":
        return f"{machine.gpus_per_host} x {machine.gpu_name or 'a GPU'} per host"
    return "--use-cpu" if config.distributed.use_cpu else "no CUDA GPU here"


def explain_launcher(config: RunConfig) -> tuple[str, str]:
    """auto: ray when a Ray address is given (--ray-address, or RAY_ADDRESS as `ray job submit` sets it),
    in-process for one worker, else local processes (torch elastic)."""
    d = config.distributed
    if d.launcher == "auto" and (d.ray_address or os.environ.get("RAY_ADDRESS")):
        return "ray", "a Ray address is set" + ("" if d.ray_address else " (RAY_ADDRESS)")
    if d.launcher in ("auto", "local") and d.num_workers == 1:
        return "inprocess", "one worker runs in this process"
    if d.launcher == "auto":
        return "local", f"{d.num_workers} workers on this host (torch elastic)"
    return d.launcher, "asked for"


def explain_strategy(config: RunConfig, world_size: int, machine: Machine = Machine()) -> tuple[str, str]:
    """The documented rule for --strategy auto (docs, 'Choosing an engine'), and why it chose:
    a DeepSpeed JSON means DeepSpeed; one worker means single; several GPU workers get the faster of DDP and
    FSDP2 that fits, as `zerotune plan` predicts it; where the plan does not know the GPU or the model, DDP when
    the model and its training state fit one GPU with room for activations, else FSDP2. On CPU: DDP."""
    wanted = config.distributed.strategy
    if wanted != "auto":
        return wanted, "asked for"
    if config.distributed.deepspeed_config and not config.distributed.no_deepspeed:
        return "deepspeed", "a DeepSpeed JSON was given"
    if world_size == 1:
        return "single", "one worker"
    if machine.device_type != "cuda":
        return "ddp", "CPU workers"
    from zerotune.plan.report import auto_engine

    picked = auto_engine(config, world_size, machine.gpu_name, machine.gpus_per_host) if machine.gpu_name else None
    if picked:
        return picked
    from zerotune.model import training_state_bytes

    unknown = "GPU or model unknown to zerotune plan; chose by whether the training state fits one GPU"
    if training_state_bytes(config) > 0.6 * machine.gpu_memory_bytes:
        return "fsdp", unknown
    return "ddp", unknown


def choose_strategy(config: RunConfig, world_size: int, machine: Machine = Machine()) -> str:
    return explain_strategy(config, world_size, machine)[0]


def _explain_zero_stage(config: RunConfig) -> tuple[int, str]:
    if config.distributed.deepspeed_config:
        from zerotune.strategies.deepspeed_config import read_user_config, zero_stage

        user = read_user_config(config.distributed.deepspeed_config)
        stage = zero_stage(user, config.distributed.zero_stage)
        asked = (user.get("zero_optimization") or {}).get("stage", "missing")
        return stage, (f"{config.distributed.deepspeed_config} says {asked!r}" +
                       (" (auto: distributed.zero_stage)" if asked == "auto" else ""))
    return config.distributed.zero_stage, "our ZeRO preset"


def _explain_zero3_fetch(config: RunConfig) -> tuple[str, str]:
    """ZeRO-3 fetches whole decoder layers (--zero3-fetch layer) unless the user's JSON names its own leaf
    modules, which then rule."""
    if config.distributed.deepspeed_config:
        from zerotune.strategies.deepspeed_config import read_user_config

        zero = read_user_config(config.distributed.deepspeed_config).get("zero_optimization") or {}
        if "leaf_module" in zero:
            return "json", f"{config.distributed.deepspeed_config} names its own leaf modules"
    return config.distributed.zero3_fetch, "asked for" if config.distributed.zero3_fetch != "layer" else \
        "one fetch and release per decoder layer (the default)"


def explain_dtype(asked: str, machine: Machine) -> tuple[str, str]:
    """auto: bf16 where the GPU supports it, fp32 on CPU (CPU bf16 matmuls are slow and lossy) and on GPUs
    without bf16."""
    if asked != "auto":
        return asked, "asked for"
    if machine.device_type == "cuda" and machine.bf16:
        return "bf16", "the GPU supports bf16"
    if machine.device_type == "cuda":
        return "fp32", "the GPU has no bf16"
    return "fp32", "CPU (bf16 matmuls there are slow and lossy)"


def _explain_mixed_precision(config: RunConfig, strategy: str, dtype: str) -> tuple[str, str]:
    if strategy == "deepspeed":
        return "engine", "DeepSpeed runs its own precision (its bf16/fp16 section); no autocast around its model"
    if dtype == "fp32":
        return "off", "fp32 weights: nothing to cast to"
    if not config.model.mixed_precision:
        return "off", "asked for: the fp32 adapter weights multiply in fp32"
    return "on", f"autocast to {dtype} around each forward; fp32 adapter weights multiply on tensor cores"


def explain_attention(asked: str, device_type: str) -> tuple[str, str]:
    flash = importlib.util.find_spec("flash_attn") is not None
    if asked == "flash_attention_2" and not flash:
        raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package; use sdpa")
    if asked != "auto":
        return asked, "asked for"
    if device_type == "cuda" and flash:
        return "flash_attention_2", "flash-attn is installed and this is a GPU"
    return "sdpa", "torch's scaled_dot_product_attention" + ("" if device_type != "cuda" else
                                                             " (flash-attn is not installed)")


def explain_compile(asked: str, device_type: str, zero3: bool) -> tuple[bool, str]:
    """model.compile auto: on for CUDA GPUs under one process, DDP, FSDP2 and DeepSpeed ZeRO-1/2 (where it was
    measured); off on CPU and under ZeRO-3. There DeepSpeed fetches each module's parameters in hooks that run
    inside a compiled layer: torch.compile traces them and recompiles past its limit, so the run is right but
    slower than eager, and ``on`` is refused."""
    check_compile_allowed(asked, zero3)
    if asked != "auto":
        return asked == "on", "asked for"
    if zero3:
        return False, "ZeRO-3's per-module parameter hooks would recompile the layers past torch.compile's limit"
    if device_type != "cuda":
        return False, "CPU (compiling costs more than it saves there)"
    return True, "CUDA GPU: each decoder layer compiled (the first steps are slow)"


def check_compile_allowed(asked: str, zero3: bool) -> None:
    """A ConfigError for --compile on under ZeRO-3 (see explain_compile)."""
    if zero3 and asked == "on":
        raise ConfigError("model.compile: on does not work under DeepSpeed ZeRO-3 (its per-module parameter hooks "
                          "run inside the compiled layers, which then recompile past torch.compile's limit); drop "
                          "--compile, or use --zero-stage 2 or --strategy fsdp")


def _explain_checkpoint_placement(config: RunConfig) -> tuple[str, str]:
    """Where a compiled layer's gradient checkpoint goes (zerotune.speed.compile.checkpoint_in_forward, which
    checks each layer for the same exclusions)."""
    if config.adapter.method == "qlora":
        return "around each layer", "4-bit layers: torch 2.11's compiler keeps activations a checkpoint inside " \
                                    "would drop"
    if config.adapter.dropout > 0:
        return "around each layer", "--lora-dropout draws random numbers inside the layer"
    return "inside each compiled layer", "the compiler then recomputes only what the backward reads " \
                                         "(layers with attention dropout keep it around)"


def explain_fused_projections(config: RunConfig, strategy: str, compiled: bool, device_type: str) -> tuple[bool, str]:
    """adapter.fused_projections. auto: with compiled layers on a CUDA GPU in one process (where it was
    measured); on: LoRA in one process or under DDP (each rank fuses its own copy; tested on CPU workers, not
    measured on GPUs). Either way kept only if its install-time logits check equals PEFT's path. A preference
    objective's reference pass runs the same fused groups with the adapters' contribution multiplied by zero
    (objectives.step.adapters_zeroed; tests/test_preference_speed.py)."""
    setting = config.adapter.fused_projections
    if setting == "off":
        return False, "asked for"
    if config.adapter.method != "lora":
        return False, f"covers LoRA on bf16/fp32 bases, not {config.adapter.method}"
    if setting == "on":
        if strategy in ("single", "ddp"):
            return True, "asked for; kept if its install-time check equals PEFT's logits"
        return False, f"covers one process or DDP, not {strategy}"
    if not (compiled and device_type == "cuda" and strategy == "single"):
        return False, "auto fuses with compiled layers on one CUDA worker (where it was measured)"
    return True, "compiled layers on one CUDA worker; kept if its install-time check equals PEFT's logits"


def explain_chunked_loss(config: RunConfig, strategy: str) -> tuple[bool, str]:
    """model.chunked_loss: SFT's loss sum, or the preference objectives' per-token log-probabilities of the scored
    tokens, from the output head in chunks (zerotune.speed.chunked_loss). Kept only if the model's head is a plain
    linear layer (checked when installed). Where a preference run trains the head (full fine-tuning) its weight
    gradient is computed again in the backward from the saved weight, which was tested in one process and
    under DDP only: FSDP2 and DeepSpeed keep the logits there."""
    if not config.model.chunked_loss:
        return False, "asked for: the model's own logits"
    if config.objective.name == "sft":
        return True, "if the model's output head is a plain linear layer (checked when installed; else the stock " \
                     "loss, with a note)"
    if config.adapter.method == "full" and strategy not in ("single", "ddp"):
        return False, f"--objective {config.objective.name} with --method full under {strategy}: the trained " \
                      "head's chunked gradient was tested in one process and under DDP only"
    return True, f"--objective {config.objective.name}: each scored token's log-probability from the head in " \
                 "chunks, no [batch, seq, vocab] logits (if the head is a plain linear layer; checked when installed)"


def explain_cuda_graph(config: RunConfig, *, device_type: str, strategy: str, compiled: bool, attention: str,
                       fixed_shapes: Callable[[], bool | None]) -> tuple[bool, str]:
    """Whether steps replay as CUDA graphs (``train.cuda_graph``). ``on`` needs one CUDA worker, compiled layers
    and SDPA attention, and raises a ConfigError naming the first that is missing; ``auto`` also wants LoRA or
    QLoRA and batches that have one shape anyway, and turns graphs off where anything is missing. Either way
    the plain-causal check on the loaded model has the last word (zerotune.speed)."""
    setting = config.train.cuda_graph
    if setting == "off":
        return False, "asked for"
    if config.objective.name != "sft":  # "on" is refused by config.check_preference_settings
        return False, f"--objective {config.objective.name}: pairs are not run in a graph"
    required = [(attention == "sdpa", f"needs SDPA attention (this run would use {attention}; pass "
                                      "--attn-implementation sdpa)"),
                (device_type == "cuda" and strategy == "single",
                 f"needs one worker on a CUDA GPU (this run has {strategy} on {device_type})"),
                (compiled, "needs compiled layers")]
    missing = [why for met, why in required if not met]
    if setting == "on":
        if missing:
            raise ConfigError(f"train.cuda_graph: {missing[0]}; drop --cuda-graph")
        return True, "asked for; kept if the model's attention runs without a mask (checked when installed)"
    if not missing and config.adapter.method not in ("lora", "qlora"):
        missing.append("full fine-tuning was not tested in a graph")
    if not missing and not config.data.packing:
        shapes = fixed_shapes()
        if shapes is None:
            return False, "unpacked data: on only if every example fills data.max_seq_len (known once tokenized)"
        if not shapes:
            missing.append("unpacked examples of varying length would be padded to data.max_seq_len; --packing "
                           "fixes the shape")
    if missing:
        return False, missing[0]
    return True, "LoRA/QLoRA on one CUDA worker with one batch shape; kept if the model's attention runs " \
                 "without a mask (checked when installed)"


def _explain_compiled_nf4(config: RunConfig, strategy: str, compiled: bool) -> tuple[bool, str]:
    if not config.model.compiled_nf4:
        return False, "asked for: bitsandbytes' own matmul"
    if not compiled:
        return False, "needs compiled layers"
    if strategy != "single":
        return False, f"measured in one process only (this run: {strategy}): bitsandbytes' own matmul"
    return True, "in torch ops, compiled with its layer (if the installed bitsandbytes packs NF4 as expected)"
