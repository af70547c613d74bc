"""The preference objectives against TRL, the reference implementation, on a tiny Llama and a tiny Falcon on CPU in
fp32: for the same pairs (our tokens) and the same LoRA weights, the per-example log-probabilities, the loss and
its gradients equal those of TRL's DPOTrainer (loss_type sigmoid, reference = the base with the adapter off),
ORPOTrainer and CPOTrainer with loss_type simpo (trl.experimental in TRL 1.16), to 1e-5. DPO's label smoothing
(conservative DPO) is compared with TRL's own label-smoothed sigmoid loss (CPOTrainer.cpo_loss, loss_type sigmoid)
applied to the DPO log-ratios, since TRL's DPOTrainer keeps label smoothing for its other loss types."""

import copy
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import corpus, read_jsonl
from helpers import random_adapters
from zerotune import adapters
from zerotune.config import AdapterConfig, ObjectiveConfig
from zerotune.data.encode import IGNORE_INDEX
from zerotune.data.pairs import collate_pairs, encode_pairs
from zerotune.objectives import create_objective
from zerotune.objectives.logps import score_pairs
from zerotune.objectives.step import Reference
from zerotune.quickstart import resource
from zerotune.tiny import save_tiny_model

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (trl needs datasets)

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["llama", "falcon"])
def model_dir(request, tmp_path_factory):
    extra = {"kv_heads": 2} if request.param == "llama" else {}
    return save_tiny_model(tmp_path_factory.mktemp("models") / request.param, corpus(), request.param,
                           vocab_size=300, hidden_size=32, layers=2, heads=4, seed=0, **extra)


def pair_records() -> list[dict]:
    """Four pairs of different lengths: the chosen answer counts right, the rejected one overshoots."""
    records = read_jsonl(resource("quickstart_train.jsonl"))[:4]
    return [{"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"] + ", 99, 100"}
            for r in records]


def ours(model_dir):
    """Our policy: the base with LoRA (r 8, all-linear, no dropout), every adapter weight random (nonzero)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return random_adapters(adapters.apply_method(base, AdapterConfig(r=8, alpha=16, dropout=0.0), seed=0))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def our_loss(model, objective, batch):
    """One micro-batch through the objective as PreferenceStep computes it (its only micro-batch, one rank)."""
    strategy = types.SimpleNamespace(unwrap=lambda m: m)
    reference = Reference(strategy).scores(model, batch) if objective.uses_reference else None
    policy = score_pairs(model, batch)
    result = objective(policy, reference)
    loss = sum(term / count for term, count in zip(result.terms, objective.normalisers(batch)))
    loss.backward()
    return policy, reference, result, loss


def encoded(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = encode_pairs(tokenizer, pair_records(), ["r"] * 4, "alpaca", 512, "truncate")
    return tokenizer, pairs


def trl_args(config_class, tmp_path, **settings):
    return config_class(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], disable_dropout=True,
                        bf16=False, fp16=False, **settings)


def string_dataset():
    return Dataset.from_list(pair_records())


def assert_grads_equal(left: dict, right: dict):
    assert left.keys() == right.keys() and left
    for name in left:
        torch.testing.assert_close(left[name], right[name], **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_dpo_equals_trl_dpo_trainer(model_dir, tmp_path):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer, pairs = encoded(model_dir)
    policy_model = ours(model_dir)
    objective = create_objective(ObjectiveConfig(name="dpo", beta=0.3))
    policy, reference, _, loss = our_loss(policy_model, objective, collate_pairs(pairs, tokenizer.pad_token_id))

    # TRL: a new adapter on the base (so its reference is the base with the adapter off), given our weights
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                         args=trl_args(DPOConfig, tmp_path, beta=0.3, loss_type=["sigmoid"], max_length=None),
                         train_dataset=string_dataset(), processing_class=tokenizer, peft_config=lora)
    trl_model = trainer.model
    trl_model.load_state_dict(policy_model.state_dict(), strict=False)
    assert all(torch.equal(p, q) for p, q in zip(trl_model.parameters(), policy_model.parameters()))
    trl_model.train()
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                      for p in pairs])
    trl_loss = trainer.compute_loss(trl_model, batch)
    trl_loss.backward()

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        trl_logps = trl_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                              fused_lm_head=True).log_probs.sum(1)
        with trl_model.disable_adapter():
            trl_reference = trl_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=labels, fused_lm_head=True).log_probs.sum(1)
    torch.testing.assert_close(torch.cat([policy.chosen, policy.rejected]).detach(), trl_logps, **TOLERANCE)
    torch.testing.assert_close(torch.cat([reference.chosen, reference.rejected]), trl_reference, **TOLERANCE)
    assert not torch.allclose(trl_logps, trl_reference)  # the adapter changes what the reference is compared with
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), **TOLERANCE)
    assert_grads_equal(grads(policy_model), grads(trl_model))
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    rewards_chosen = objective(policy.detach(), reference).chosen_rewards
    assert metrics["rewards/chosen"] == pytest.approx(float(rewards_chosen.mean()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_label_smoothing_equals_trl_label_smoothed_sigmoid(model_dir, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    tokenizer, pairs = encoded(model_dir)
    model = ours(model_dir)
    objective = create_objective(ObjectiveConfig(name="dpo", beta=0.5, label_smoothing=label_smoothing))
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    policy, reference, _, loss = our_loss(model, objective, batch)
    ours_grads = grads(model)
    model.zero_grad()
    # TRL's label-smoothed sigmoid, on the DPO log-ratios (its "logits" are chosen - rejected of what it is given)
    trl_self = types.SimpleNamespace(alpha=0.0, beta=0.5, label_smoothing=label_smoothing, loss_type="sigmoid",
                                     accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    policy = score_pairs(model, batch)
    losses, _, _ = CPOTrainer.cpo_loss(trl_self, policy.chosen - reference.chosen, policy.rejected - reference.rejected)
    losses.mean().backward()
    torch.testing.assert_close(loss.detach(), losses.mean().detach(), **TOLERANCE)
    assert_grads_equal(ours_grads, grads(model))


def trl_pair_batch(pairs, pad_token_id) -> dict[str, torch.Tensor]:
    """Our pairs in the batch layout TRL's CPO and ORPO trainers read (their tokenize_row + padding collator)."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p.prompt_ids + getattr(p, f"{side}_ids") for p in pairs]
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), pad_token_id)
        labels = torch.full((len(rows), longest), IGNORE_INDEX)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, (pair, tokens) in enumerate(zip(pairs, rows)):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, len(pair.prompt_ids):len(tokens)] = torch.tensor(tokens[len(pair.prompt_ids):])
            mask[row, :len(tokens)] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


@pytest.mark.parametrize("objective_name", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl(objective_name, model_dir, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer, pairs = encoded(model_dir)
    model = ours(model_dir)
    trl_model = copy.deepcopy(model)
    settings = dict(beta=0.25, simpo_gamma=0.4, label_smoothing=0.1)
    objective = create_objective(ObjectiveConfig(name=objective_name, **settings))
    policy, _, _, loss = our_loss(model, objective, collate_pairs(pairs, tokenizer.pad_token_id))

    if objective_name == "orpo":
        trainer = ORPOTrainer(trl_model, args=trl_args(ORPOConfig, tmp_path, beta=0.25), train_dataset=string_dataset(),
                              processing_class=tokenizer)
    else:
        args = trl_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, **settings)
        trainer = CPOTrainer(trl_model, args=args, train_dataset=string_dataset(), processing_class=tokenizer)
    trl_model.train()
    batch = trl_pair_batch(pairs, tokenizer.pad_token_id)
    trl_loss, metrics = trainer.get_batch_loss_metrics(trl_model, batch)
    trl_loss.backward()
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.concatenated_forward(trl_model, batch)[:2]  # mean log-prob per token
    torch.testing.assert_close(policy.chosen.detach() / policy.chosen_tokens, trl_chosen, **TOLERANCE)
    torch.testing.assert_close(policy.rejected.detach() / policy.rejected_tokens, trl_rejected, **TOLERANCE)
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), **TOLERANCE)
    assert_grads_equal(grads(model), grads(trl_model))
    margin = objective(policy.detach()).chosen_rewards - objective(policy.detach()).rejected_rewards
    assert metrics["rewards/margins"] == pytest.approx(float(margin.mean()), rel=1e-5, abs=1e-7)
