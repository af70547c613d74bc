"""Data as users bring it: ShareGPT, CSV/TSV, save_to_disk directories, folders of shards, hub subsets, column
mapping and a system prompt. Each format trains end to end, and its per-step losses equal those of the same
records written as the JSONL the format stands for (so a conversion that loses or reorders anything fails)."""

import csv
import json
import re

import pytest

from conftest import make_config, read_jsonl, write_jsonl
from helpers import train
from test_bad_input import no_model_loading, run_cli  # noqa: F401 (a fixture)
from zerotune.config import DataConfig
from zerotune.data.formats import parse_columns, sharegpt_messages
from zerotune.errors import ConfigError, DataError

STEPS = {"train.max_steps": 2}


def chat_records(alpaca_records: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                          {"role": "assistant", "content": r["output"]}]} for r in alpaca_records]


def sharegpt(messages_record: dict) -> dict:
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]}
                              for m in messages_record["messages"]]}


def write_delimited(path, records: list[dict], delimiter: str):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows({name: r.get(name, "") for name in ("instruction", "input", "output")} for r in records)
    return path


def losses(tiny_llama, data, out, **overrides) -> list[float]:
    return train(make_config(tiny_llama, data, out, **{**STEPS, **overrides})).losses


@pytest.fixture(scope="module")
def alpaca_records(alpaca_file):
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
            for r in read_jsonl(alpaca_file)]


@pytest.fixture(scope="module")
def alpaca_reference(tiny_llama, alpaca_records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("alpaca_reference")
    data = write_jsonl(folder / "train.jsonl", alpaca_records)
    return data, losses(tiny_llama, data, folder / "run", **{"data.template": "alpaca"})


@pytest.mark.slow
def test_csv_tsv_arrow_and_shards_train_like_jsonl(tiny_llama, alpaca_records, alpaca_reference, tmp_path):
    import datasets

    _, expected = alpaca_reference
    write_delimited(tmp_path / "train.csv", alpaca_records, ",")
    write_delimited(tmp_path / "train.tsv", alpaca_records, "\t")
    datasets.Dataset.from_list(alpaca_records).save_to_disk(str(tmp_path / "arrow"))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-00000.jsonl", alpaca_records[:20])
    write_jsonl(shards / "part-00001.jsonl", alpaca_records[20:])
    parquet_shards = tmp_path / "parquet_shards"
    parquet_shards.mkdir()
    datasets.Dataset.from_list(alpaca_records[:30]).to_parquet(str(parquet_shards / "a.parquet"))
    datasets.Dataset.from_list(alpaca_records[30:]).to_parquet(str(parquet_shards / "b.parquet"))
    for source in ("train.csv", "train.tsv", "arrow", "shards", "parquet_shards"):
        got = losses(tiny_llama, tmp_path / source, tmp_path / f"run-{source}", **{"data.template": "alpaca"})
        assert got == pytest.approx(expected, rel=1e-6), source


@pytest.mark.slow
def test_column_mapping_trains_like_renamed_records(tiny_llama, alpaca_records, alpaca_reference, tmp_path):
    _, expected = alpaca_reference
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in alpaca_records]
    data = write_jsonl(tmp_path / "qa.jsonl", renamed)
    got = losses(tiny_llama, data, tmp_path / "run", **{"data.template": "alpaca",
                                                        "data.columns": "question=instruction,context=input,"
                                                                        "answer=output"})
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_sharegpt_and_system_prompt_train_like_messages(tiny_llama, alpaca_records, tmp_path):
    chats = chat_records(alpaca_records)
    messages = write_jsonl(tmp_path / "messages.jsonl", chats)
    share = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(r) for r in chats])
    assert losses(tiny_llama, share, tmp_path / "share") == pytest.approx(
        losses(tiny_llama, messages, tmp_path / "messages"), rel=1e-6)
    # The system prompt goes first in every conversation that has none: equal to writing it into each record.
    system = "You answer briefly."
    with_system = write_jsonl(tmp_path / "with_system.jsonl", [
        {"messages": [{"role": "system", "content": system}, *r["messages"]]} for r in chats])
    prompted = losses(tiny_llama, share, tmp_path / "prompted", **{"data.system_prompt": system})
    assert prompted == pytest.approx(losses(tiny_llama, with_system, tmp_path / "explicit"), rel=1e-6)
    assert prompted != pytest.approx(losses(tiny_llama, messages, tmp_path / "messages2"), rel=1e-6)


def bilingual_repository(folder, alpaca_records):
    """A dataset repository as the hub stores it (data files and a README whose YAML names the subsets)."""
    folder.mkdir()
    write_jsonl(folder / "en.jsonl", alpaca_records[:24])
    write_jsonl(folder / "rest.jsonl", alpaca_records[24:])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
                                      "    path: en.jsonl\n- config_name: rest\n  data_files:\n  - split: train\n"
                                      "    path: rest.jsonl\n---\n")
    return folder


@pytest.mark.slow
def test_hub_subset_trains(tiny_llama, alpaca_records, tmp_path, monkeypatch):
    """A hub id with --subset: only the download is replaced (by the same repository on disk); datasets itself
    resolves the subset. Same losses as the subset's records as JSONL."""
    import datasets

    repository = bilingual_repository(tmp_path / "repository", alpaca_records)
    real_load = datasets.load_dataset
    asked = []

    def from_disk(path, name=None, **kwargs):
        asked.append((path, name))
        return real_load(str(repository) if path == "example-org/bilingual" else path, name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_disk)
    expected = losses(tiny_llama, write_jsonl(tmp_path / "rest.jsonl", alpaca_records[24:]), tmp_path / "ref",
                      **{"data.template": "alpaca"})
    got = losses(tiny_llama, "example-org/bilingual", tmp_path / "hub", **{"data.template": "alpaca",
                                                                           "data.subset": "rest"})
    assert ("example-org/bilingual", "rest") in asked
    assert got == pytest.approx(expected, rel=1e-6)
    # The repository folder itself, with --subset, reads the same way without any replacement.
    monkeypatch.setattr(datasets, "load_dataset", real_load)
    assert losses(tiny_llama, repository, tmp_path / "local", **{"data.template": "alpaca",
                                                                 "data.subset": "rest"}) == pytest.approx(expected)


def test_sharegpt_roles():
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
             {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]
    assert [m["role"] for m in sharegpt_messages(turns, "f line 1")] == [
        "system", "user", "assistant", "user", "assistant"]
    with pytest.raises(DataError, match=r"^f line 1: conversations\[2\] \(turn 3\): a system turn must come first"):
        sharegpt_messages(turns[1:3] + [{"from": "system", "value": "late"}], "f line 1")


def test_column_mapping_parse():
    assert parse_columns(["question=instruction", " answer = output"]) == {"question": "instruction",
                                                                            "answer": "output"}
    for bad, pattern in ((["question"], "not source=target"), (["a=x", "b=x"], "mapped to 'x'"),
                         (["a=x", "a=y"], "mapped twice")):
        with pytest.raises(ConfigError, match=pattern):
            parse_columns(bad)


BAD = {
    "csv_extra_field": ("bad.csv", "instruction,input,output\na,,b\na,b,c,d\n",
                        r"bad\.csv row 2 \(line 3\): 4 fields, but the header has 3"),
    "csv_short_row": ("bad.csv", "instruction,input,output\na,b\n",
                      r"bad\.csv row 1 \(line 2\): no value for column 'output'"),
    "csv_missing_column": ("bad.csv", "instruction,input\na,b\n",
                           r'bad\.csv row 1 \(line 2\): missing field "output"'),
    "csv_empty": ("bad.csv", "", r"bad\.csv: empty file"),
    "tsv_empty_instruction": ("bad.tsv", "instruction\tinput\toutput\na\t\tb\n\t\tc\n",
                              r'bad\.tsv row 2 \(line 3\): missing field "instruction"'),
    "sharegpt_speaker": ("bad.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                                    {"from": "bot", "value": "a"}]}) + "\n",
                         r"bad\.jsonl line 1: conversations\[1\] \(turn 2\): unknown speaker 'bot'"),
    "sharegpt_no_value": ("bad.jsonl", '{"conversations": [{"from": "human", "value": "q"}]}\n'
                                       '{"conversations": [{"from": "human"}]}\n',
                          r'bad\.jsonl line 2: conversations\[0\] \(turn 1\) needs "from" and "value"'),
    "sharegpt_not_text": ("bad.jsonl", '{"conversations": [{"from": "human", "value": "q"}, '
                                       '{"from": "gpt", "value": 3}]}\n',
                          r'bad\.jsonl line 1: conversations\[1\] \(turn 2\): "value" must be text, got int'),
    "sharegpt_no_answer": ("bad.jsonl", '{"conversations": [{"from": "human", "value": "q"}]}\n',
                           r"bad\.jsonl line 1: no assistant message"),
    "sharegpt_empty": ("bad.jsonl", '{"conversations": []}\n',
                       r'bad\.jsonl line 1: field "conversations" must be a non-empty list'),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_records_name_file_and_place(case, tiny_llama, tmp_path, capsys, no_model_loading):  # noqa: F811
    name, content, pattern = BAD[case]
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    status, err = run_cli(capsys, "--model", tiny_llama, "--data", data, "--output-dir", tmp_path / "out",
                          "--max-steps", "1", "--batch-size", "1")
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_malformed_arrow_shards_and_subsets(tiny_llama, alpaca_records, tmp_path, capsys, no_model_loading):  # noqa: F811
    import datasets

    def error_for(data, *extra):
        status, err = run_cli(capsys, "--model", tiny_llama, "--data", data, "--output-dir", tmp_path / "out",
                              "--max-steps", "1", "--batch-size", "1", *extra)
        assert status == 2 and len(err.splitlines()) == 1, err
        return err

    arrow = tmp_path / "arrow"
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
                               ).save_to_disk(str(arrow))
    capsys.readouterr()  # the progress bar of writing it
    assert re.search(r'arrow row 2: missing field "output"', error_for(arrow))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", alpaca_records[:3])
    (shards / "part-1.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert re.search(r'part-1\.jsonl line 2: missing field "output"', error_for(shards))
    write_delimited(shards / "part-2.csv", alpaca_records[:2], ",")
    assert "holds files of several types (.csv, .jsonl)" in error_for(shards)
    (tmp_path / "empty").mkdir()
    assert "a directory with no .json, .jsonl, .parquet, .csv or .tsv files" in error_for(tmp_path / "empty")
    repository = bilingual_repository(tmp_path / "repository", alpaca_records)
    assert re.search(r"cannot load hub dataset .*repository' \(subset 'fr', split 'train'\): .*fr",
                     error_for(repository, "--subset", "fr"))
    assert re.search(r"data\.columns: 'question' is not source=target",
                     error_for(shards, "--columns", "question"))


@pytest.mark.parametrize("line, bad, pattern", [
    (4321, "{not json", r"big\.jsonl line 4321: malformed JSON"),
    (4999, json.dumps({"instruction": "q", "output": 7}), r'big\.jsonl line 4999: field "output" has the wrong type'),
])
def test_errors_in_a_large_file_name_their_line(tmp_path, line, bad, pattern):
    """A file large enough to be checked by datasets' map in 2 processes (zerotune.data.records.read_table):
    the error still names its line, counted with the blank lines that are skipped."""
    from zerotune.data.prepare import check_data

    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(5000)]
    lines[99] = ""  # a blank line: skipped, and still counted
    lines[line - 1] = bad
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as raised:
        check_data(DataConfig(path=str(data), cache_dir=str(tmp_path / "cache")), seed=0)
    assert len(str(raised.value).splitlines()) == 1
    assert not list((tmp_path / "cache").glob("checking-*"))  # the check's scratch files are gone
