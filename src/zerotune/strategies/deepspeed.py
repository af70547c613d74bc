"""DeepSpeed ZeRO stages 1-3, with optional CPU offload, from our presets or a user's JSON."""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from pathlib import Path

import torch

from zerotune.strategies.base import Strategy
from zerotune.strategies.collectives import CollectivesMixin
from zerotune.strategies.deepspeed_config import preset, read_user_config, resolve, zero_stage


def layer_fetch_names(model) -> list[str]:
    """The decoder layers ZeRO-3 should treat as leaf modules: one fetch, one release and one gradient
    reduction per layer instead of a hook per linear layer and LoRA matrix. The first layer is left out:
    DeepSpeed reduces a leaf's gradients in a full backward hook, which fires before the layer's backward
    when no input of the layer needs a gradient (frozen embeddings), and the gradients would then land on
    released parameters."""
    from zerotune.model import decoder_layers

    layers = {id(layer) for layer in decoder_layers(model)[1:]}
    return [name for name, module in model.named_modules() if id(module) in layers]


def _held_4bit_node(output):
    """The autograd node of bitsandbytes' 4-bit matmul behind a Linear4bit's output (its ``.to(input dtype)``
    may sit on top), or None."""
    node = getattr(output, "grad_fn", None)
    for _ in range(2):
        if node is None:
            return None
        held = getattr(node, "tensors", None)
        if isinstance(held, tuple) and len(held) == 2:
            return node
        node = node.next_functions[0][0] if node.next_functions else None
    return None


def _drop_gathered_4bit_view(module, args, output):
    node = _held_4bit_node(output)
    if node is None or node.tensors[1] is None:
        return
    node.tensors = (node.tensors[0], None)  # the view of the gathered weight: no longer pinned until backward
    weak = weakref.ref(node)  # no cycle node -> hook -> node: a graph dropped unused (a recompute's) goes at once

    def refetch(grad_outputs):  # ZeRO-3 has gathered the layer again for its backward
        live = weak()
        if live is not None:
            live.tensors = (live.tensors[0], module.weight.view(-1, 1))

    node.register_prehook(refetch)


def release_4bit_weights(model) -> int:
    """ZeRO-3 with a 4-bit (QLoRA) base: let each gathered layer's memory go after its forward.

    bitsandbytes' 4-bit matmul keeps a view of the packed weight in its autograd node (``ctx.tensors``, not
    ``save_for_backward``), for the backward pass. Under ZeRO-3 that weight is a gathered copy, and DeepSpeed
    releases a parameter by pointing it at an empty tensor: the view then keeps the gathered copy alive until
    backward, so every layer's full weight stays resident through the forward pass, and gradient
    checkpointing's recompute gathers a second one (2 H200s, 32 layers: 9.7 GiB per GPU against 5.2 GiB on one
    GPU, benchmarks/results/*-qlora-sharded-32-layers.json). Here the node drops the view after the forward
    and takes the parameter's current data again just before its backward runs, when ZeRO-3 has gathered the
    layer anew. FSDP2 needs none of this: it frees the gathered storage itself, views included.
    Returns how many 4-bit layers were hooked."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.register_forward_hook(_drop_gathered_4bit_view)
            count += 1
    return count


class DeepSpeedStrategy(CollectivesMixin, Strategy):
    name = "deepspeed"
    checkpoint_format = "deepspeed"
    reshardable = False  # ZeRO partitions are tied to the worker count (DeepSpeed's universal format aside)
    # The engine computes in its bf16/fp16 section's dtype and turns an outer autocast off around the model (and
    # warns that it did, on every run): autocast around it would change nothing.
    own_precision = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = None
        self.ds_config: dict | None = None
        self._sync = True
        self._hf_zero3 = None  # transformers' ZeRO-3 switch, alive for the run once the model loaded partitioned
        self._source_config: dict | None = None

    def _resolved(self, hidden_size: int, total_steps: int) -> dict:
        bf16_ok = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return resolve(self._source(), self.config, self.world_size, hidden_size, total_steps, self.device.type,
                       bf16_ok)

    def _fetches_layers(self) -> bool:
        """ZeRO-3 with whole decoder layers as DeepSpeed leaf modules (--zero3-fetch layer, unless the user's
        JSON names its own leaf modules)."""
        zero = self._source().get("zero_optimization") or {}
        return self.gathers_per_module and self.config.distributed.zero3_fetch == "layer" and "leaf_module" not in zero

    def load_base_model(self, dtype, total_steps, attention=None):
        """--sharded-loading under ZeRO-3: transformers builds the model inside deepspeed.zero.Init, so each
        parameter is partitioned as it is created, and fills it from the checkpoint one tensor at a time
        (each worker maps the safetensors files; weights are copied in one module at a time and broadcast).
        No worker ever holds the whole model in memory."""
        from zerotune.model import load_model

        if not (self.config.distributed.sharded_loading and self.gathers_per_module):
            return super().load_base_model(dtype, total_steps, attention)
        import deepspeed
        import torch.distributed as dist
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        # DeepSpeed's config checks the batch against its own view of the world: join it to our process group
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

        hidden = getattr(AutoConfig.from_pretrained(self.config.model.name,
                                                    trust_remote_code=self.config.model.trust_remote_code),
                         "hidden_size", 4096)
        self._hf_zero3 = HfDeepSpeedConfig(self._resolved(hidden, total_steps))
        return load_model(self.config.model, self.config.adapter.method, self.device, dtype, partitioned=True,
                          attention=attention)

    def _source(self) -> dict:
        """The user's JSON as written (read once per run: the stage checks, loading and wrap all consult it),
        or our preset. Callers copy before changing it (resolve does)."""
        if self._source_config is None:
            self._source_config = read_user_config(self.config.distributed.deepspeed_config) \
                if self.config.distributed.deepspeed_config else preset(self.config)
        return self._source_config

    @property
    def gathers_per_module(self) -> bool:
        return zero_stage(self._source(), self.config.distributed.zero_stage) == 3

    def wrap(self, model, build_optimizer, build_scheduler, total_steps):
        import deepspeed

        hidden = getattr(getattr(model, "config", None), "hidden_size", 4096)
        self.ds_config = self._resolved(hidden, total_steps)
        if self._fetches_layers():
            # The prefetch bucket stays 0.9 x hidden^2: prefetching a whole layer measured no faster with the
            # tutorial's offload JSON and 10% slower without offload (2 H200s, ca1bb67 against b7569b5).
            self.ds_config["zero_optimization"]["leaf_module"] = {"names": layer_fetch_names(model)}
        if self.is_main:  # what DeepSpeed was given, every "auto" resolved
            path = Path(self.config.output.dir) / "deepspeed_config.json"
            path.write_text(json.dumps(self.ds_config, indent=2) + "\n")
        if self.gathers_per_module:
            release_4bit_weights(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in self.ds_config else build_optimizer(params)
        scheduler = None if "scheduler" in self.ds_config else build_scheduler
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.ds_config, dist_init_required=False,
        )
        return self.engine

    def close(self):
        """Leave no global state behind for a later run in this process: transformers' ZeRO-3 switch (it would
        build the next model inside zero.Init) and DeepSpeed's communicator and cloned world group (they would
        point at this run's process group, destroyed next)."""
        if getattr(self, "_hf_zero3", None) is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_zero3 = None
        self.engine = None
        try:
            import deepspeed.comm.comm as ds_comm
            from deepspeed.utils import groups
        except ImportError:
            return
        ds_comm.cdb = None
        groups._WORLD_GROUP = None

    @contextlib.contextmanager
    def accumulating(self, model, sync):
        self._sync = sync
        yield

    def backward(self, loss):
        # The loop already divides by the global token count; DeepSpeed must not divide again by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._sync:
            self.engine.step()  # counts the micro-step; the optimizer runs only at the boundary

    drops_steps_on_device = False  # the loop reads each step back at once and stops before a bad update

    def optimizer_step(self, model, loss_total):
        """DeepSpeed clips and applies inside engine.step(). It cannot drop a step (so on_nonfinite=skip is
        refused): a non-finite loss is caught here, before the engine steps, and the loop stops."""
        if not math.isfinite(float(loss_total)):
            return torch.tensor(float("nan")), torch.tensor(False)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else float("nan")), torch.tensor(True)

    def save_state(self, model, directory):
        """DeepSpeed's own format: each rank writes its partition; frozen base weights are left out (they
        come from the base model on resume)."""
        self.engine.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=True,
                                    save_latest=False)

    def load_state(self, model, directory):
        # DeepSpeed reads its files with torch.load(weights_only=False); zerotune points it only at checkpoints
        # this run family wrote into its own output directory, checked against their manifest first.
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint to load")

    def advance_schedule(self):
        pass  # engine.step() advances DeepSpeed's scheduler (its JSON's or ours)

    def current_lr(self):
        return self.engine.get_lr()[0]

    def unwrap(self, model):
        return self.engine.module

    def _zero3(self) -> bool:
        return self.ds_config["zero_optimization"].get("stage") == 3

    def trainable_state_dict(self, model):
        """Under ZeRO-3, gather only the trainable (adapter) tensors, never the frozen base."""
        inner = self.unwrap(model)
        named = [(name, p) for name, p in inner.named_parameters() if p.requires_grad]
        if not self._zero3():
            return {name: p.detach().cpu() for name, p in named} if self.is_main else {}
        import deepspeed

        state = {}
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if self.is_main:
                state = {name: p.detach().cpu().clone() for name, p in named}
        return state

    def full_state_dict(self, model):
        if self._zero3():
            return self.engine._zero3_consolidated_16bit_state_dict()
        return super().full_state_dict(model) if self.is_main else {}
