"""Mixtures: several datasets, each drawn by weight or example count and rendered with its own template."""

import re

import pytest

from conftest import make_config, read_jsonl, write_jsonl
from helpers import train
from test_bad_input import no_model_loading, run_cli  # noqa: F401 (a fixture)
from zerotune.config import DataConfig
from zerotune.data.mixture import Source, parse_mix_entry
from zerotune.errors import ConfigError


def test_draw_by_weight_and_count():
    assert Source("a", "auto").draw(5, seed=0, position=0) == [0, 1, 2, 3, 4]
    half = Source("a", "auto", weight=0.5).draw(10, seed=0, position=0)
    assert len(half) == 5 and half == sorted(set(half))
    twice_and_a_half = Source("a", "auto", weight=2.5).draw(4, seed=0, position=0)
    assert twice_and_a_half[:8] == [0, 1, 2, 3] * 2 and len(twice_and_a_half) == 10
    assert len(Source("a", "auto", examples=7).draw(3, seed=0, position=1)) == 7
    # Seeded per position: the same entry draws the same records; another seed or position another sample.
    draws = {(seed, position): tuple(Source("a", "auto", weight=0.5).draw(40, seed, position))
             for seed in (0, 1) for position in (0, 1)}
    assert draws[(0, 0)] == tuple(Source("a", "auto", weight=0.5).draw(40, 0, 0))
    assert len(set(draws.values())) == 4


def test_mix_entry_parsing():
    config = DataConfig(template="auto", split="train")
    assert parse_mix_entry("data/a.jsonl weight=0.25 template=alpaca_es", 0, config) == Source(
        "data/a.jsonl", "alpaca_es", "train", "", 0.25, None)
    assert parse_mix_entry("org/name examples=100 subset=en split=test", 0, config) == Source(
        "org/name", "auto", "test", "en", None, 100)
    for entry, pattern in (("a.jsonl weight=2 examples=3", "weight or examples, not both"),
                           ("a.jsonl weight=x", "weight=x is not a number"),
                           ("a.jsonl weight=0", "weight must be a number above 0"),
                           ("a.jsonl examples=0", "examples must be 1 or more"),
                           ("a.jsonl size=3", r"'size=3' is not one of weight=\.\.\."),
                           ("weight=2 a.jsonl", "write the dataset path first"),
                           ("a.jsonl template=vicuna", "unknown template 'vicuna'"),
                           ("a.jsonl columns=question", r"columns: 'question' is not source=target"),
                           ("a.jsonl columns=q=instruction,a=instruction", "two columns are mapped to")):
        with pytest.raises(ConfigError, match=pattern):
            parse_mix_entry(entry, 1, config)


@pytest.fixture
def two_datasets(alpaca_file, tmp_path):
    """An Alpaca file (48 records) and a chat file (20 conversations)."""
    alpaca = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
              for r in read_jsonl(alpaca_file)]
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in alpaca[::-1][:20]]
    return (write_jsonl(tmp_path / "alpaca.jsonl", alpaca), alpaca), (write_jsonl(tmp_path / "chat.jsonl", chats),
                                                                      chats)


@pytest.mark.slow
def test_mixture_trains_as_its_draw_and_logs_each_contribution(tiny_llama, two_datasets, tmp_path, capsys):
    """A weight-0.5 Alpaca set with the Spanish template and 30 examples of a 20-conversation chat set: the
    same per-step losses as one file holding exactly the drawn records, and the log line gives the counts."""
    (alpaca_path, alpaca), (chat_path, chats) = two_datasets
    mix = [f"{alpaca_path} weight=0.5 template=alpaca_es", f"{chat_path} examples=30 template=chat"]
    config = make_config(tiny_llama, "", tmp_path / "mixed", **{"data.path": "", "data.mix": mix,
                                                                "train.max_steps": 3, "data.max_seq_len": 512})
    mixed = train(config).losses
    out = capsys.readouterr().out
    assert re.search(rf"mixture: {re.escape(str(alpaca_path))} \(alpaca_es\) 24 examples \(24 drawn, weight 0.5, "
                     rf"of 48 records\); {re.escape(str(chat_path))} \(chat\) 30 examples \(30 drawn, examples=30, "
                     r"of 20 records\)", out), out
    assert "templates alpaca_es: 24, chat: 30" in out
    drawn = ([{**alpaca[i], "lang": "es"} for i in Source("", "", weight=0.5).draw(48, 0, 0)]
             + [chats[i] for i in Source("", "", examples=30).draw(20, 0, 1)])
    single = write_jsonl(tmp_path / "drawn.jsonl", drawn)  # auto: alpaca_es for "lang": "es", chat for messages
    expected = train(make_config(tiny_llama, single, tmp_path / "single", **{"train.max_steps": 3,
                                                                                  "data.max_seq_len": 512})).losses
    assert mixed == pytest.approx(expected, rel=1e-6)


def test_mixture_counts_dropped_examples_per_dataset(tiny_llama, two_datasets):
    from zerotune.data.prepare import prepare_data
    from zerotune.model import load_tokenizer
    from zerotune.config import ModelConfig

    (alpaca_path, _), (chat_path, _) = two_datasets
    config = DataConfig(mix=[f"{alpaca_path} template=alpaca", f"{chat_path} weight=2"], max_seq_len=115,
                        overlong="drop", eval_fraction=0.0)
    data = prepare_data(config, load_tokenizer(ModelConfig(name=str(tiny_llama))), seed=0)
    kept = [int(re.search(r"\) (\d+) examples", line).group(1)) for line in data.report.sources]
    assert sum(kept) == data.report.kept == len(data.train) and data.report.total == 48 + 40
    assert 0 < kept[0] < 48 and kept[1] == 40 and data.report.dropped == 88 - sum(kept)


def renamed_mixture(two_datasets, tmp_path):
    """The two datasets with other field names each (question/answer; a ShareGPT-like ``dialog``), and the
    mixture entries that rename them back, each with its own columns=."""
    (alpaca_path, alpaca), (chat_path, chats) = two_datasets
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in alpaca])
    dialogs = write_jsonl(tmp_path / "dialogs.jsonl", [{"dialog": r["messages"]} for r in chats])
    renamed = [f"{questions} weight=0.5 template=alpaca columns=question=instruction,context=input "
               "columns=answer=output",  # the key repeats, or takes several renames separated by commas
               f"{dialogs} examples=30 template=chat columns=dialog=messages"]
    return renamed, [f"{alpaca_path} weight=0.5 template=alpaca", f"{chat_path} examples=30 template=chat"]


@pytest.mark.parametrize("cache", [True, False])
def test_each_mixture_entry_renames_its_own_columns(tiny_llama, two_datasets, tmp_path, cache):
    """Per-entry columns= give exactly the examples of the same records with the template's field names, on the
    cache's Arrow path and on the list path (--no-data-cache); data.columns stays the default of the others."""
    from zerotune.config import ModelConfig
    from zerotune.data.prepare import prepare_data
    from zerotune.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_llama)))
    renamed, original = renamed_mixture(two_datasets, tmp_path)

    def examples(mix, **extra):
        config = DataConfig(mix=mix, max_seq_len=256, eval_fraction=0.1, cache=cache,
                            cache_dir=str(tmp_path / "cache"), **extra)
        data = prepare_data(config, tokenizer, seed=0)
        return [(e.input_ids, e.labels) for split in (data.train, data.eval) for e in split], data.report

    expected, expected_report = examples(original)
    got, report = examples(renamed)
    assert got == expected and len(got) == 24 + 30
    assert report.templates == expected_report.templates == {"alpaca": 24, "chat": 30}
    # data.columns renames the entries without their own columns=
    default = [renamed[0].split(" columns=")[0], renamed[1]]
    assert examples(default, columns=["question=instruction", "context=input", "answer=output"])[0] == expected


@pytest.mark.slow
def test_mixture_with_renamed_columns_trains_like_renamed_records(tiny_llama, two_datasets, tmp_path):
    renamed, original = renamed_mixture(two_datasets, tmp_path)
    runs = [train(make_config(tiny_llama, "", tmp_path / name, **{"data.path": "", "data.mix": mix,
                                                                  "data.max_seq_len": 256})).losses
            for name, mix in (("renamed", renamed), ("original", original))]
    assert runs[0] == pytest.approx(runs[1], rel=1e-6) and len(runs[0]) == 3


def test_bad_mixtures_fail_before_any_model_loads(tiny_llama, two_datasets, tmp_path, capsys,
                                                  no_model_loading):  # noqa: F811
    (alpaca_path, _), (chat_path, _) = two_datasets
    for extra, pattern in (
            (["--data", alpaca_path, "--mix", f"{chat_path}"], "pass --data for one dataset or --mix for several"),
            (["--mix", f"{alpaca_path} weight=half"], r"data\.mix\[0\] .*weight=half is not a number"),
            (["--mix", f"{alpaca_path},{tmp_path / 'missing.jsonl'} weight=2"],
             r"missing\.jsonl: data file not found; check the path given to --mix")):
        status, err = run_cli(capsys, "--model", tiny_llama, "--output-dir", tmp_path / "out", "--max-steps", "1",
                              *map(str, extra))
        assert status == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
