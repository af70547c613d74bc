"""Does a LoRA adapter fit a base model? Checked before generate or merge loads any weight.

The real test is the modules: every module the adapter changes must exist in the base, with the sizes the
adapter's A and B matrices were trained for. The base is built from its config.json on the meta device (no
memory; 0.3 s for Llama-2-7B on this CPU once transformers' Llama code is imported, which loading needs anyway),
the adapter's shapes are read from its safetensors header. The base model
recorded at training time (adapter/zerotune.json) is only the hint in the message: a local copy of the same
model, or another fine-tune of the same architecture, fits.
"""

from __future__ import annotations

import json
from pathlib import Path

from zerotune.errors import ConfigError

PEFT_PREFIX = "base_model.model."


def adapted_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (inputs, outputs) of each linear layer the adapter changes, from lora_A (r x inputs) and
    lora_B (outputs x r). Empty when the weights are not in safetensors."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    inputs, outputs = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            for part, sizes, axis in ((".lora_A.weight", inputs, 1), (".lora_B.weight", outputs, 0)):
                shape = handle.get_slice(key).get_shape()
                if key.endswith(part) and len(shape) == 2:
                    sizes[key[: -len(part)].removeprefix(PEFT_PREFIX)] = shape[axis]
    return {module: (inputs[module], outputs.get(module, -1)) for module in inputs}


def base_linear_shapes(model_config, trust_remote_code: bool = False) -> dict[str, tuple[int, int]] | None:
    """Module path -> (inputs, outputs) of every linear layer of the base, built on the meta device. None when
    the architecture cannot be built here (then the check is skipped and loading reports what it finds)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture this transformers cannot build: nothing to compare against
        return None
    shapes = {}
    for name, module in model.named_modules():
        inputs = getattr(module, "in_features", None) or getattr(module, "nx", None)  # nn.Linear, or GPT-2's Conv1D
        outputs = getattr(module, "out_features", None) or getattr(module, "nf", None)
        if isinstance(inputs, int) and isinstance(outputs, int):
            shapes[name] = (inputs, outputs)
    return shapes


def recorded_base(adapter_dir: Path) -> str:
    """The base model named at training time: zerotune.json, else PEFT's adapter_config.json, else ''."""
    for name, key in (("zerotune.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = Path(adapter_dir) / name
        try:
            value = json.loads(path.read_text()).get(key) if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return value
    return ""


def check_adapter_fits(model_name: str, adapter_dir: str | Path, model_config, trust_remote_code: bool = False) -> None:
    """A one-line ConfigError when the base ``model_name`` (its ``model_config`` from check_model_source) lacks
    a module the adapter changes, or has it in another size; says which base the adapter was trained on."""
    adapted = adapted_shapes(Path(adapter_dir))
    base = base_linear_shapes(model_config, trust_remote_code) if adapted else None
    if not adapted or base is None:
        return
    trained_on = recorded_base(Path(adapter_dir))
    advice = (f"pass --model {trained_on}" if trained_on and trained_on != model_name
              else "pass the base model it was trained on")
    origin = f"adapter {adapter_dir} was trained on {trained_on}" if trained_on else f"adapter {adapter_dir}"
    missing = sorted(module for module in adapted if module not in base)
    if missing:
        leaves = sorted({module.rsplit(".", 1)[-1] for module in missing})
        raise ConfigError(f"{origin}; --model {model_name} does not have its modules ({', '.join(leaves[:6])}"
                          f"{', ...' if len(leaves) > 6 else ''}: {len(missing)} of {len(adapted)} missing); {advice}")
    for module, (inputs, outputs) in sorted(adapted.items()):
        have_inputs, have_outputs = base[module]
        if inputs != have_inputs or outputs not in (have_outputs, -1):
            raise ConfigError(f"{origin}; --model {model_name} has its modules in other sizes ({module}: "
                              f"{have_inputs} -> {have_outputs} features, the adapter's {inputs} -> {outputs}): "
                              f"another size of the model; {advice}")
