"""FSDP2 (``fully_shard``): one unit per decoder layer plus the root, with a mixed-precision policy.

Frozen base weights and trainable LoRA weights share a unit; FSDP2 shards both and reduces only the
gradients that exist. Gradients are reduced in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from zerotune.model import decoder_layers
from zerotune.strategies.base import Strategy
from zerotune.strategies.collectives import CollectivesMixin


class FSDPStrategy(CollectivesMixin, Strategy):
    name = "fsdp"

    def load_base_model(self, dtype, total_steps, attention=None):
        """--sharded-loading: parameters on the meta device; wrap() allocates this rank's shards and reads
        only their rows from the safetensors files (or draws them, with --init random)."""
        from zerotune.model import load_model

        return load_model(self.config.model, self.config.adapter.method, self.device, dtype,
                          on_meta=self.config.distributed.sharded_loading, attention=attention)

    def wrap(self, model, build_optimizer, build_scheduler, total_steps):
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        on_meta = any(p.is_meta for p in model.parameters())
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if on_meta else {}
        param_dtype = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            raise RuntimeError(f"FSDP: no decoder layers found in {type(model).__name__}")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if on_meta:  # --sharded-loading: allocate only this rank's shards, then read just those rows
            from zerotune.strategies.sharded_loading import load_local_shards

            model.to_empty(device=self.device)
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
            random_std = model.config.initializer_range if self.config.model.init == "random" else None
            load_local_shards(model, self.config.model.name, self.config.train.seed, random_std)
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(self.optimizer)
        return model

    @contextlib.contextmanager
    def accumulating(self, model, sync):
        model.set_requires_gradient_sync(sync)
        yield

    checkpoint_format = "dcp"

    def _global_norm(self, norm):
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def save_state(self, model, directory):
        """Each rank writes its own shard (torch.distributed.checkpoint); nothing is gathered. DCP reshards
        on load, so a checkpoint resumes on another worker count."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(model), checkpoint_id=str(directory / "fsdp"))
        if self.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, directory / "scheduler.pt")

    def load_state(self, model, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state(model)
        dcp.load(state, checkpoint_id=str(directory / "fsdp"))
        set_state_dict(model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        scheduler = torch.load(directory / "scheduler.pt", weights_only=True)["scheduler"]
        self.scheduler.load_state_dict(scheduler)

    def _sharded_state(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(model, self.optimizer,
                                                      options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model_state, "optimizer": optimizer_state}

    def trainable_state_dict(self, model):
        """Gathers only trainable tensors (the adapter for LoRA), never the frozen base."""
        state = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
                if self.is_main:
                    state[name] = full.detach().cpu()
        return state

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
