"""``zerotune data preview`` through the real CLI: the examples training sees, learned text marked, counts."""

import re

from transformers import AutoTokenizer

from conftest import read_jsonl, write_jsonl
from test_bad_input import no_model_loading  # noqa: F401 (a fixture)
from zerotune.cli import main
from zerotune.data.batches import BatchPlan
from zerotune.data.encode import encode_records
from zerotune.data.preview import EXAMPLE_BREAK, LEARN_CLOSE, LEARN_OPEN


def run_preview(capsys, *argv) -> tuple[int, str, str]:
    status = main(["data", "preview", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_preview_marks_responses_and_counts_truncated_and_dropped(tiny_llama, alpaca_file, tmp_path, capsys,
                                                                   no_model_loading):  # noqa: F811
    records = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
               for r in read_jsonl(alpaca_file)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    full, _ = encode_records(tokenizer, records, [""] * len(records), "alpaca", 10**6, "drop")
    limit = 120
    dropped = sum(len(e.input_ids) > limit for e in full)
    status, out, err = run_preview(capsys, "--model", tiny_llama, "--data", data, "--template", "alpaca",
                                   "--max-seq-len", limit, "--overlong", "drop", "--eval-fraction", 0, "-n", 4)
    assert status == 0, err
    assert f"{len(records) - dropped} of {len(records)} examples kept (0 truncated, {dropped} dropped" in out
    assert 0 < dropped < len(records)
    # The four shown are the first four of epoch 0, and each shows its prompt as context and exactly its
    # output and EOS as the learned text.
    kept = [r for r, e in zip(records, full) if len(e.input_ids) <= limit]
    shown = re.findall(r"--- example \d of 4 \(training set position (\d+)\): (\d+) tokens, (\d+) with labels ---\n"
                       r"(.*?)(?=\n---)", out, flags=re.S)
    assert [int(s[0]) for s in shown] == BatchPlan(len(kept), 4, 1, 1, seed=42).epoch_order(0)[:4]
    for position, _, learned, text in shown:
        record = kept[int(position)]
        assert text.count(LEARN_OPEN) == 1 and text.endswith(f"{LEARN_OPEN}{record['output']}</s>{LEARN_CLOSE}")
        assert "### Response:" in text.split(LEARN_OPEN)[0] and record["instruction"] in text.split(LEARN_OPEN)[0]
        assert int(learned) == len(tokenizer(record["output"], add_special_tokens=False)["input_ids"]) + 1
    # Under truncate the long ones are cut, except those whose prompt alone fills the window (nothing to learn).
    prompt_fills = sum(e.labels.index(next(t for t in e.labels if t != -100)) >= limit for e in full)
    status, out, _ = run_preview(capsys, "--model", tiny_llama, "--data", data, "--template", "alpaca",
                                 "--max-seq-len", limit, "--eval-fraction", 0, "-n", 1, "--show-ids")
    assert status == 0 and 0 < prompt_fills < dropped
    assert (f"{len(records) - prompt_fills} of {len(records)} examples kept ({dropped - prompt_fills} truncated, "
            f"{prompt_fills} dropped") in out
    assert re.search(r"^input_ids: \[\d+, ", out, flags=re.M) and re.search(r"^labels:    \[-100, ", out, flags=re.M)


def test_preview_of_packed_chat_rows(tiny_llama, tmp_path, capsys, no_model_loading):  # noqa: F811
    chats = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}!"}]}
             for i in range(12)]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    status, out, err = run_preview(capsys, "--model", tiny_llama, "--data", data, "--packing", "--max-seq-len", 128,
                                   "--system-prompt", "Be brief.", "-n", 1, "--eval-fraction", 0)
    assert status == 0, err
    row = re.search(r"--- packed row 1 of 1 .*?---\n(.*?)(?=\n---)", out, flags=re.S).group(1)
    examples = row.split(EXAMPLE_BREAK)
    assert len(examples) > 1
    for text in examples:  # the system prompt and the user turn are context; the answer and its EOS are learned
        said = re.search(r"Say (\d+)\.", text).group(1)
        assert "<|system|>\nBe brief." in text and f"{LEARN_OPEN}{said}!</s>" in text
    assert "packed 12 examples into" in out


def test_preview_reports_bad_data_in_one_line(tiny_llama, tmp_path, capsys, no_model_loading):  # noqa: F811
    data = tmp_path / "bad.csv"
    data.write_text("question,answer\nWhat?,This.\n")
    status, out, err = run_preview(capsys, "--model", tiny_llama, "--data", data)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert 'bad.csv row 1 (line 2): missing field "instruction"' in err
    status, out, err = run_preview(capsys, "--model", tiny_llama, "--data", data, "--columns",
                                   "question=instruction,answer=output", "-n", 1)
    assert status == 0 and f"{LEARN_OPEN}This.</s>{LEARN_CLOSE}" in out
