"""generate and merge on a trained adapter."""

import json
from pathlib import Path

import torch

from helpers import train
from zerotune.cli import main


def test_merge_logits_equal_base_plus_adapter(config_for, tmp_path, capsys):
    """Merged weights give the same logits as base + LoRA; tolerance 1e-5 abs (fp32 reassociation)."""
    config = config_for(**{"train.max_steps": 3, "train.lr": 5e-2})
    train(config)
    adapter = Path(config.output.dir) / "adapter"
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", config.model.name, "--adapter", str(adapter), "--output-dir",
                 str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(config.model.name).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
        adapted_logits = adapted(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=0, atol=1e-5)
    # A second merge into the same directory refuses.
    assert main(["merge", "--model", config.model.name, "--adapter", str(adapter), "--output-dir",
                 str(merged_dir)]) == 2


def test_generate_uses_recorded_template(config_for, tmp_path, capsys):
    config = config_for(**{"train.max_steps": 1, "data.template": "alpaca_es"})
    train(config)
    adapter = Path(config.output.dir) / "adapter"
    from zerotune.generate import resolve_template

    assert resolve_template(None, str(adapter)) == "alpaca_es"
    assert resolve_template("alpaca", str(adapter)) == "alpaca"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Cuenta del 1 al 3."}) + "\n" +
                       json.dumps({"instruction": "Count from 1 to 3."}) + "\n")
    capsys.readouterr()
    assert main(["generate", "--model", config.model.name, "--adapter", str(adapter), "--prompts", str(prompts),
                 "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["instruction"] for line in lines] == ["Cuenta del 1 al 3.", "Count from 1 to 3."]
    assert all(isinstance(line["response"], str) for line in lines)
    # Greedy decoding is deterministic: the single-prompt mode gives the same text.
    assert main(["generate", "--model", config.model.name, "--adapter", str(adapter), "--instruction",
                 "Cuenta del 1 al 3.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == lines[0]["response"]
