"""Templates, response-only labels, EOS, truncation and the global batch order."""

import pytest
from transformers import AutoTokenizer

from zerotune.data.batches import BatchPlan, collate
from zerotune.data.encode import IGNORE_INDEX, encode_alpaca, encode_chat, encode_records
from zerotune.data.templates import ALPACA, ALPACA_ES, template_for_record
from zerotune.errors import DataError

RECORD = {"instruction": "Count from 3 to 5.", "input": "", "output": "3, 4, 5"}


def test_spanish_template_text():
    prompt = ALPACA_ES.render_prompt("Cuenta del 1 al 3.", "contexto")
    assert prompt.startswith("A continuación hay una instrucción que describe una tarea")
    assert "### Instrucción:\nCuenta del 1 al 3.\n\n### Entrada:\ncontexto\n\n### Respuesta:\n" in prompt
    assert "### Entrada" not in ALPACA_ES.render_prompt("x")


def test_auto_template_per_record():
    assert template_for_record({"messages": []}, "auto") == "chat"
    assert template_for_record({"lang": "es"}, "auto") == "alpaca_es"
    assert template_for_record({}, "auto") == "alpaca"
    assert template_for_record({"lang": "es"}, "alpaca") == "alpaca"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_pad_eos"])
def test_labels_mask_prompt_and_keep_eos(fixture, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    example = encode_alpaca(tokenizer, RECORD, "alpaca")
    prompt_ids = tokenizer(ALPACA.render_prompt(RECORD["instruction"]))["input_ids"]
    response_ids = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids):] == response_ids + [tokenizer.eos_token_id]
    # Padding must not unlabel EOS, also when pad == eos.
    short = encode_alpaca(tokenizer, {**RECORD, "output": "3"}, "alpaca")
    batch = collate([example, short], tokenizer.pad_token_id)
    row = batch["labels"][1]
    assert row[len(short.labels) - 1] == tokenizer.eos_token_id
    assert (row[len(short.labels):] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == len(short.input_ids)


def test_chat_labels_only_assistant_turns(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    record = {"messages": [{"role": "user", "content": "Count from 1 to 3."},
                           {"role": "assistant", "content": "1, 2, 3"},
                           {"role": "user", "content": "Now down."},
                           {"role": "assistant", "content": "3, 2, 1"}]}
    example = encode_chat(tokenizer, record)
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert learned.replace("</s>", "|").split("|")[:2] == ["1, 2, 3", "\n3, 2, 1"]
    assert "Count" not in learned and "Now down" not in learned
    assert example.labels[-2:] != [IGNORE_INDEX, IGNORE_INDEX]


def test_truncate_and_drop_are_reported(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    long = {"instruction": "Count.", "output": ", ".join(str(i) for i in range(60))}
    records = [RECORD, long]
    limit = len(encode_alpaca(tokenizer, RECORD, "alpaca").input_ids) + 2
    examples, report = encode_records(tokenizer, records, ["a", "b"], "alpaca", limit, "truncate")
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 0)
    assert len(examples[1].input_ids) == limit
    examples, report = encode_records(tokenizer, records, ["a", "b"], "alpaca", limit, "drop")
    assert (report.kept, report.dropped) == (1, 1)
    with pytest.raises(DataError, match="all 2 examples are longer than data.max_seq_len=10"):
        encode_records(tokenizer, records, ["a", "b"], "alpaca", 10, "drop")


def test_global_batch_is_the_same_for_any_worker_count():
    one = BatchPlan(40, 2, 4, 1, seed=3)
    two = BatchPlan(40, 2, 2, 2, seed=3)
    for step in range(one.steps_per_epoch):
        union_one = sorted(i for mb in one.micro_batches(0, step, 0) for i in mb)
        union_two = sorted(i for rank in range(2) for mb in two.micro_batches(0, step, rank) for i in mb)
        assert union_one == union_two
    assert one.epoch_order(0) != one.epoch_order(1)


def test_sharded_tokenization_reassembles_the_same_examples(tiny_llama, alpaca_file):
    """Two workers each tokenize half the records; the gathered set equals one process's, in order."""
    from zerotune.config import DataConfig
    from zerotune.data.prepare import prepare_data

    from zerotune.data.encode import encode_records
    from zerotune.data.records import read_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    records, where = read_records(str(alpaca_file))
    lengths = sorted(len(e.input_ids) for e in encode_records(tokenizer, records, where, "auto", 10**6, "drop")[0])
    limit = lengths[len(lengths) // 2]  # about half the records are dropped
    config = DataConfig(path=str(alpaca_file), max_seq_len=limit, overlong="drop", eval_fraction=0.25, cache=False)
    whole = prepare_data(config, tokenizer, seed=0)
    shards = {}

    def gather(value):  # stands in for the engine's all-gather; rank 1's shard was made beforehand
        return [value, shards[1]]

    shards[1] = encode_records(tokenizer, records[1::2], where[1::2], "auto", limit, "drop", keep_dropped=True)
    sharded = prepare_data(config, tokenizer, 0, rank=0, world_size=2, gather=gather)
    assert [e.input_ids for e in sharded.train] == [e.input_ids for e in whole.train]
    assert [e.labels for e in sharded.eval] == [e.labels for e in whole.eval]
    assert (sharded.report.kept, sharded.report.dropped) == (whole.report.kept, whole.report.dropped)
    assert whole.report.dropped > 0  # the case where dropping shifts positions is exercised


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_pad_eos"])
def test_batched_tokenization_gives_the_per_record_ids(fixture, request, alpaca_file):
    """encode_records tokenizes Alpaca records a batch at a time: exactly the ids and labels of encode_alpaca
    record by record, in order, with chat and pre-tokenized records interleaved."""
    from conftest import read_jsonl
    from zerotune.data import encode

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    records = read_jsonl(alpaca_file)
    records.insert(3, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    records.insert(7, {"input_ids": [5, 6, 7]})
    records.append({"instruction": "Say nothing.", "output": ""})
    request.getfixturevalue("monkeypatch").setattr(encode, "BATCH_RECORDS", 5)  # several batches, one partial
    examples, _ = encode_records(tokenizer, records, [""] * len(records), "auto", 10**6, "drop")
    for record, example in zip(records, examples, strict=True):
        if "messages" in record:
            expected = encode_chat(tokenizer, record)
        elif "input_ids" in record:
            expected = type(example)(record["input_ids"], record["input_ids"])
        else:
            expected = encode_alpaca(tokenizer, record, template_for_record(record, "auto"))
        assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
