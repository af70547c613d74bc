"""The install-time check of zerotune.speed.fused_projections: kept only if the fused model still computes what
PEFT computes, else PEFT's forwards go back (this path patches PEFT's LoRA layers and transformers' attention and
MLP forwards, which upstream releases change)."""

from __future__ import annotations

import torch

from zerotune.speed.fused_projections import install_fused_projections


def uninstall_fused_projections(model: torch.nn.Module) -> None:
    """Back to PEFT's forwards (and the modules' own): the frozen weights stay views of the stacked tensors,
    with the same values, so the model computes what it did before install_fused_projections."""
    for handle in getattr(model, "_zerotune_fused_hooks", []):
        handle.remove()
    model._zerotune_fused_hooks = []
    for module in model.modules():
        for saved in ("_zerotune_peft_forward", "_zerotune_mlp_forward", "_zerotune_attention_forward"):
            if saved in module.__dict__:
                module.forward = module.__dict__.pop(saved)
        for name in ("_zerotune_group", "_zerotune_index"):
            module.__dict__.pop(name, None)
        module.__dict__.pop("_zerotune_qkv_view", None)


def install_checked(model: torch.nn.Module, precision, swiglu: bool = True) -> tuple[int, str | None]:
    """install_fused_projections, kept only if it took and the model still computes what PEFT computes.

    This path patches PEFT's LoRA layers and transformers' attention and MLP forwards, which upstream releases
    change. So the model's logits on a fixed random input are compared before and after: with the adapters'
    B matrices briefly random (at their zero start a wrong adapter path would not show), under the run's
    ``precision`` context. A difference above a tenth of what the adapters themselves change, or an error,
    puts PEFT's forwards back. Returns how many groups are fused, and why none are when the check failed."""
    saved = _randomize_lora_b(model)
    try:
        with torch.no_grad():
            reference = probe_logits(model, precision)
            with _adapters_disabled(model):
                without_adapters = probe_logits(model, precision)
            count = install_fused_projections(model, swiglu=swiglu)
            if not count:
                return 0, None
            try:
                fused = probe_logits(model, precision)
            except Exception as error:  # noqa: BLE001 - any upstream change that breaks the patched forwards
                uninstall_fused_projections(model)
                return 0, f"the fused forward failed on this transformers/PEFT ({type(error).__name__}: {error})"
    finally:
        _restore_lora_b(model, saved)
    scale = (reference - without_adapters).norm() / reference.norm()
    error = (fused - reference).norm() / reference.norm()
    if not bool(torch.isfinite(error)) or error > max(1e-5, 0.1 * float(scale)):
        uninstall_fused_projections(model)
        return 0, (f"its logits differ from PEFT's by {float(error):.2e} (relative; the adapters change them by "
                   f"{float(scale):.2e}) on this transformers/PEFT")
    return count, None


def probe_logits(model: torch.nn.Module, precision) -> torch.Tensor:
    """Logits on 16 fixed random token ids, in eval mode (no dropout); the global RNG is not touched."""
    training = model.training
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(embeddings.num_embeddings, (1, 16), generator=generator).to(embeddings.weight.device)
    model.eval()
    try:
        with precision():
            return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(training)


def _lora_b_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    from peft.tuners.lora.layer import LoraLayer

    return [module.lora_B[name].weight for module in model.modules() if isinstance(module, LoraLayer)
            for name in module.lora_B.keys()]


def _randomize_lora_b(model: torch.nn.Module) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weights = _lora_b_weights(model)
    saved = [weight.detach().clone() for weight in weights]
    with torch.no_grad():
        for weight in weights:
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    return saved


def _restore_lora_b(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for weight, value in zip(_lora_b_weights(model), saved):
            weight.copy_(value)


def _adapters_disabled(model: torch.nn.Module):
    import contextlib

    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()
