"""Tell transformers' SDPA mask builder what the host already knows about a batch.

Before each forward, transformers decides whether a batch needs an attention mask or can take SDPA's causal
fast path, by looking at the batch on the device: for a batch without a mask it probes the position ids for
packed sequences (a host-GPU sync), and while a CUDA stream captures it cannot look, so it always builds a
mask. The two decisions then differ, and layers compiled for one do not fit the other (they recompile in the
middle of a capture, which fails). zerotune knows on the host whether a batch is plain causal: no padding and
no packed boundary (is_plain_causal). Inside ``plain_causal(True)`` the mask builder of the attention
implementation installed here returns no mask, so SDPA runs causal whether or not a stream captures; otherwise
it is transformers' own SDPA mask builder. The attention itself is transformers' SDPA function.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "zerotune_sdpa"
_state = {"plain": False}


def _mask(*args, **kwargs):
    if _state["plain"]:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def install_plain_causal_hint(model: torch.nn.Module) -> bool:
    """Switch a model running transformers' SDPA attention to the same attention with the hinted mask
    builder. Returns False (and changes nothing) for any other attention implementation."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    configs = {id(module.config): module.config for module in model.modules()
               if getattr(getattr(module, "config", None), "_attn_implementation", None) is not None}
    if not configs or any(config._attn_implementation not in ("sdpa", NAME) for config in configs.values()):
        return False
    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    for config in configs.values():
        config._attn_implementation = NAME
    return True


@contextmanager
def plain_causal(plain: bool):
    """Within: the hinted mask builder returns no mask when ``plain`` (the batch is plain causal)."""
    before, _state["plain"] = _state["plain"], plain
    try:
        yield
    finally:
        _state["plain"] = before


def is_plain_causal(batch: dict[str, torch.Tensor]) -> bool:
    """On the host batch as the model will get it: no attention mask (a full one was dropped) and, for packed
    rows, no row holding more than one sequence (a position id 0 after the first)."""
    if "attention_mask" in batch:
        return False
    positions = batch.get("position_ids")
    return positions is None or not bool((positions[:, 1:] == 0).any())
