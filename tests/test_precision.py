"""model.mixed_precision: with 16-bit base weights, the fp32 LoRA weights multiply in 16-bit (autocast),
while the trainable parameters, their gradients and the optimizer stay fp32."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from zerotune import adapters
from zerotune.config import AdapterConfig, ModelConfig
from zerotune.data.batches import collate
from zerotune.data.encode import EncodedExample
from zerotune.model import compute_precision
from zerotune.step import token_loss_sum


def _bf16_lora(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16)
    return adapters.apply_method(model, AdapterConfig(dropout=0.0), seed=0)


def test_autocast_runs_lora_in_bf16_and_keeps_fp32_master_weights(tiny_llama):
    model = _bf16_lora(tiny_llama)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)  # PEFT's fp32 adapters
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = collate([EncodedExample(list(range(3, 40)), list(range(3, 40)))], 0)

    def run(context):
        model.zero_grad(set_to_none=True)
        with context():
            loss, _ = token_loss_sum(model, batch)
        loss.backward()
        return loss.detach().float(), lora_b.grad.clone()  # B starts at zero, so its gradient is the informative one

    off = run(compute_precision(ModelConfig(mixed_precision=False), model, torch.device("cpu")))
    assert seen[-1] == torch.float32
    on = run(compute_precision(ModelConfig(mixed_precision=True), model, torch.device("cpu")))
    assert seen[-1] == torch.bfloat16
    assert lora_b.grad.dtype == torch.float32 and on[1].abs().sum() > 0
    torch.testing.assert_close(on[0], off[0], rtol=2e-2, atol=0)  # bf16 rounding of the LoRA path only
    assert torch.nn.functional.cosine_similarity(on[1].flatten(), off[1].flatten(), dim=0) > 0.99


def test_fp32_models_are_untouched(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    context = compute_precision(ModelConfig(mixed_precision=True), model, torch.device("cpu"))
    with context():
        assert not torch.is_autocast_enabled("cpu")


def test_no_autocast_around_deepspeed_which_keeps_its_own_precision(tiny_llama):
    """DeepSpeed's engine turns an outer autocast off around its model (and warns on every run), so the loop
    enters none there; other engines get compute_precision's autocast for the same bf16 model."""
    from contextlib import nullcontext

    from zerotune.config import config_from_dict
    from zerotune.strategies.ddp import DDPStrategy
    from zerotune.strategies.deepspeed import DeepSpeedStrategy
    from zerotune.step import forward_precision

    model = _bf16_lora(tiny_llama)
    config = config_from_dict({"model": {"name": str(tiny_llama)}})
    cpu = torch.device("cpu")
    assert forward_precision(DeepSpeedStrategy(config, cpu), config, model) is nullcontext
    with forward_precision(DDPStrategy(config, cpu), config, model)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
