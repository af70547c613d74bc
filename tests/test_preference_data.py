"""Preference pairs: rendering with the SFT templates, response-only labels, truncation that keeps the prompt's
end, the chosen-then-rejected batch, and one-line errors naming the record."""

import re

import pytest
from transformers import AutoTokenizer

from zerotune.cli import main
from zerotune.data.encode import IGNORE_INDEX, encode_alpaca, encode_chat
from zerotune.data.pairs import collate_pairs, encode_pair, encode_pairs, fit_pair
from zerotune.errors import DataError

PAIR = {"prompt": "Count from 3 to 5.", "chosen": "3, 4, 5", "rejected": "3, 4, 5, 6"}
MESSAGES = [{"role": "system", "content": "Count."}, {"role": "user", "content": "Count from 1 to 3."}]


@pytest.fixture
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def sequence(pair, side):
    return pair.prompt_ids + getattr(pair, f"{side}_ids")


@pytest.mark.parametrize("template", ["alpaca", "alpaca_es"])
def test_string_pair_renders_as_the_sft_record_would(tokenizer, template):
    """Each side tokenizes exactly as the SFT record (instruction = prompt, output = that side) does."""
    pair = encode_pair(tokenizer, PAIR, template, "record 1")
    for side in ("chosen", "rejected"):
        sft = encode_alpaca(tokenizer, {"instruction": PAIR["prompt"], "output": PAIR[side]}, template)
        assert sequence(pair, side) == sft.input_ids
        assert [IGNORE_INDEX] * len(pair.prompt_ids) + getattr(pair, f"{side}_ids") == sft.labels
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("form", ["messages", "trl_prompt"])
def test_chat_pair_renders_as_the_sft_conversation_would(tokenizer, form):
    """The messages form and TRL's conversational form ("prompt" messages, assistant-message responses) give
    the tokens and labels SFT's chat encoding gives the same conversation."""
    if form == "messages":
        record = {"messages": MESSAGES, "chosen": "1, 2, 3", "rejected": "1, 2, 3, 4"}
    else:
        record = {"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "1, 2, 3"}],
                  "rejected": {"role": "assistant", "content": "1, 2, 3, 4"}}
    pair = encode_pair(tokenizer, record, "chat", "record 1")
    for side, text in (("chosen", "1, 2, 3"), ("rejected", "1, 2, 3, 4")):
        sft = encode_chat(tokenizer, {"messages": MESSAGES + [{"role": "assistant", "content": text}]})
        assert sequence(pair, side) == sft.input_ids
        assert [IGNORE_INDEX] * len(pair.prompt_ids) + getattr(pair, f"{side}_ids") == sft.labels


def test_auto_template_per_pair(tokenizer):
    _, report = encode_pairs(tokenizer, [PAIR, {**PAIR, "lang": "es"}, {"messages": MESSAGES, **PAIR}],
                             ["a", "b", "c"], "auto", 512, "truncate")
    assert report.templates == {"alpaca": 1, "alpaca_es": 1, "chat": 1}
    assert report.summary().startswith("3 of 3 pairs kept (0 truncated, 0 dropped")


def test_token_pairs_are_taken_as_they_are(tokenizer):
    """Pre-tokenized pairs (TRL's field names): no BOS or EOS added, picked by auto, cut like any pair."""
    record = {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}
    pairs, report = encode_pairs(tokenizer, [record, PAIR], ["a", "b"], "auto", 512, "truncate")
    assert (pairs[0].prompt_ids, pairs[0].chosen_ids, pairs[0].rejected_ids) == ([5, 6, 7, 8], [9, 10], [11, 12, 13])
    assert report.templates == {"tokens": 1, "alpaca": 1}
    (cut,), report = encode_pairs(tokenizer, [record], ["a"], "tokens", 6, "truncate")
    assert (cut.prompt_ids, cut.rejected_ids, report.truncated) == ([6, 7, 8], [11, 12, 13], 1)  # half the window


def test_truncation_keeps_the_prompt_end_and_its_bos(tokenizer):
    full = encode_pair(tokenizer, PAIR, "alpaca", "record 1")
    room = len(full.rejected_ids) + 6  # the prompt's share of the window, more than half of it
    limit = room + len(full.rejected_ids)
    pairs, report = encode_pairs(tokenizer, [PAIR], ["r"], "alpaca", limit, "truncate")
    cut = pairs[0]
    assert (report.truncated, report.dropped, report.kept) == (1, 0, 1)
    assert cut.longest == limit
    assert cut.prompt_ids == [tokenizer.bos_token_id] + full.prompt_ids[-(room - 1):]  # BOS, the prompt's end
    assert (cut.chosen_ids, cut.rejected_ids) == (full.chosen_ids, full.rejected_ids)  # responses whole
    _, dropped = encode_pairs(tokenizer, [PAIR, {**PAIR, "prompt": "x"}], ["r", "s"], "alpaca", limit, "drop",
                              keep_dropped=True)
    shorter = encode_pair(tokenizer, {**PAIR, "prompt": "x"}, "alpaca", "record 2")
    assert (dropped.truncated, dropped.dropped, dropped.fewest_to_keep) == (0, 2, shorter.longest)


def test_a_response_longer_than_the_window_keeps_half_for_the_prompt(tokenizer):
    full = encode_pair(tokenizer, {**PAIR, "rejected": "1, 2, 3, " * 30}, "alpaca", "record 1")
    cut = fit_pair(full, 40, tokenizer.bos_token_id)
    assert len(cut.prompt_ids) == 20 and cut.prompt_ids[-19:] == full.prompt_ids[-19:]
    assert cut.rejected_ids == full.rejected_ids[:20] and cut.chosen_ids == full.chosen_ids
    assert cut.longest == 40


def test_collate_puts_chosen_rows_then_rejected_rows_with_response_labels(tokenizer):
    pairs, _ = encode_pairs(tokenizer, [PAIR, {**PAIR, "prompt": "Count."}], ["a", "b"], "alpaca", 512, "truncate")
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    rows = [sequence(pairs[0], "chosen"), sequence(pairs[1], "chosen"), sequence(pairs[0], "rejected"),
            sequence(pairs[1], "rejected")]
    responses = [pairs[0].chosen_ids, pairs[1].chosen_ids, pairs[0].rejected_ids, pairs[1].rejected_ids]
    for index, (row, response) in enumerate(zip(rows, responses)):
        assert batch["input_ids"][index, :len(row)].tolist() == row
        assert int(batch["attention_mask"][index].sum()) == len(row)
        labels = batch["labels"][index]
        assert labels[labels != IGNORE_INDEX].tolist() == response
        assert (labels[:len(row) - len(response)] == IGNORE_INDEX).all()


def run_cli(capsys, *argv):
    status = main(["train", "--tracking", "none", *map(str, argv)])
    return status, capsys.readouterr().err.strip()


BAD_PAIRS = {
    "missing_rejected": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
                         r'bad\.jsonl line 2: missing field "rejected"'),
    "missing_prompt": ('{"chosen": "b", "rejected": "c"}\n', r'bad\.jsonl line 1: missing field "prompt"'),
    "identical": ('{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
                  r'bad\.jsonl line 1: "chosen" and "rejected" are identical'),
    "empty_response": ('{"prompt": "a", "chosen": " ", "rejected": "c"}\n', r'bad\.jsonl line 1: "chosen" is empty'),
    "bad_message": ('{"messages": [{"role": "user"}], "chosen": "b", "rejected": "c"}\n',
                    r"bad\.jsonl line 1: messages\[0\] needs role and content"),
    "token_ids_missing": ('{"prompt_ids": [1, 2], "chosen_ids": [3]}\n',
                          r'bad\.jsonl line 1: field "rejected_ids" must be a non-empty list of token ids'),
    "token_ids_identical": ('{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [3]}\n',
                            r'bad\.jsonl line 1: "chosen_ids" and "rejected_ids" are identical'),
    "response_not_text": ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
                          r'bad\.jsonl line 1: field "chosen" must be a string'),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_pairs_fail_in_one_line_naming_the_record(case, tiny_llama, tmp_path, capsys, monkeypatch):
    import zerotune.model

    monkeypatch.setattr(zerotune.model, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
    content, pattern = BAD_PAIRS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    status, err = run_cli(capsys, "--model", tiny_llama, "--data", data, "--output-dir", tmp_path / "out",
                          "--objective", "dpo", "--max-steps", "1", "--batch-size", "1")
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err


def test_sft_on_pairs_points_to_the_objective(tiny_llama, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    status, err = run_cli(capsys, "--model", tiny_llama, "--data", data, "--output-dir", tmp_path / "out")
    assert status == 2 and "line 1: a preference pair" in err and "--objective dpo" in err


def test_an_unknown_field_type_in_chat_pairs_raises(tokenizer):
    with pytest.raises(DataError, match=r'record 1: field "rejected" must be a string'):
        encode_pair(tokenizer, {"messages": MESSAGES, "chosen": "a", "rejected": [1]}, "chat", "record 1")
