"""The prepared-data cache: hits give exactly the examples of the uncached path, the key moves with every input
that changes the result and with none that does not, and one process prepares while the others wait."""

import dataclasses
import multiprocessing
import os
import time

import pytest
from transformers import AutoTokenizer

from conftest import make_config, read_jsonl, write_jsonl
from helpers import train
from zerotune.config import DataConfig
from zerotune.data import cache as data_cache
from zerotune.data.cache import ExampleTable, cached, result_key
from zerotune.data.prepare import prepare_data, prepare_tables, prepare_uncached


def as_lists(examples):
    return [(e.input_ids, e.labels, e.position_ids) for e in examples]


@pytest.fixture
def records_file(alpaca_file, tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", read_jsonl(alpaca_file))


@pytest.mark.parametrize("settings", [
    {"template": "auto", "eval_fraction": 0.1},  # English and Spanish templates, a held-out eval set
    {"template": "auto", "max_seq_len": 115, "overlong": "drop", "eval_fraction": 0.0},
    {"template": "alpaca", "max_seq_len": 115, "overlong": "truncate", "eval_fraction": 0.2},
    {"template": "auto", "packing": True, "max_seq_len": 256, "eval_fraction": 0.1},
])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_hit_gives_exactly_the_uncached_examples(settings, num_proc, tiny_llama, records_file, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = DataConfig(path=str(records_file), cache_dir=str(tmp_path / "cache"), **settings)
    expected = prepare_uncached(config, tokenizer, seed=3)
    # the cache is filled by datasets' parallel map (prepare_tables): exactly the list path's examples
    first, hit_first = cached(config, tokenizer, 3, lambda: prepare_tables(config, tokenizer, 3, num_proc))
    second, hit_second = cached(config, tokenizer, 3, lambda: pytest.fail("prepared twice"))
    assert (hit_first, hit_second) == (False, True)
    assert isinstance(second.train, ExampleTable)
    for got in (first, second):
        assert as_lists(got.train) == as_lists(expected.train)
        assert as_lists(got.eval) == as_lists(expected.eval)
        assert got.report == expected.report and got.packing == expected.packing
    assert [second.train[i].input_ids for i in (5, 0)] == [expected.train[5].input_ids, expected.train[0].input_ids]


def test_the_key_moves_with_every_input_that_changes_the_result(tiny_llama, tiny_llama_pad_eos, records_file,
                                                                 tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = DataConfig(path=str(records_file), eval_fraction=0.1)
    key = result_key(base, tokenizer, seed=0)
    edited = tmp_path / "edited.jsonl"
    edited.write_text(records_file.read_text().replace("Count", "Tally", 1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", read_jsonl(records_file)[:4])
    other_eval = write_jsonl(tmp_path / "eval2.jsonl", read_jsonl(records_file)[4:8])
    chat_template = AutoTokenizer.from_pretrained(tiny_llama)
    chat_template.chat_template = chat_template.chat_template.replace("\n", " ")
    variants = {
        "content": (dataclasses.replace(base, path=str(edited)), tokenizer, 0),
        "tokenizer": (base, AutoTokenizer.from_pretrained(tiny_llama_pad_eos), 0),
        "chat template": (base, chat_template, 0),
        "template": (dataclasses.replace(base, template="alpaca"), tokenizer, 0),
        "max_seq_len": (dataclasses.replace(base, max_seq_len=512), tokenizer, 0),
        "overlong": (dataclasses.replace(base, overlong="drop"), tokenizer, 0),
        "packing": (dataclasses.replace(base, packing=True), tokenizer, 0),
        "columns": (dataclasses.replace(base, columns=["output=response"]), tokenizer, 0),
        "system_prompt": (dataclasses.replace(base, system_prompt="Be brief."), tokenizer, 0),
        "mixture": (dataclasses.replace(base, path="", mix=[f"{records_file} weight=0.5"]), tokenizer, 0),
        "seed (held-out eval)": (base, tokenizer, 1),
        "eval_fraction": (dataclasses.replace(base, eval_fraction=0.2), tokenizer, 0),
        "eval file": (dataclasses.replace(base, eval_path=str(eval_file)), tokenizer, 0),
    }
    keys = {name: result_key(*variant) for name, variant in variants.items()}
    keys["eval file content"] = result_key(dataclasses.replace(base, eval_path=str(other_eval)), tokenizer, 0)
    mixed = dataclasses.replace(base, path="", mix=[f"{records_file} weight=0.5"])
    keys["seed (mixture draw)"] = result_key(mixed, tokenizer, 1)
    keys["mixture weight"] = result_key(dataclasses.replace(mixed, mix=[f"{records_file} weight=0.6"]), tokenizer, 0)
    assert key not in keys.values()
    assert len(set(keys.values())) == len(keys)


def test_the_key_stays_for_inputs_that_do_not_change_the_result(tiny_llama, records_file, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = DataConfig(path=str(records_file), eval_fraction=0.0)
    key = result_key(base, tokenizer, seed=0)
    os.utime(records_file, (time.time() + 100, time.time() + 100))  # touched, same bytes
    monkeypatch.chdir(records_file.parent)
    assert result_key(dataclasses.replace(base, path="train.jsonl"), tokenizer, 0) == key  # relative path
    assert result_key(base, AutoTokenizer.from_pretrained(tiny_llama), 0) == key  # the tokenizer loaded again
    assert result_key(base, tokenizer, seed=5) == key  # the seed decides nothing here (no hold-out, no draw)
    assert result_key(dataclasses.replace(base, cache_dir=str(tmp_path / "elsewhere")), tokenizer, 0) == key
    assert result_key(dataclasses.replace(base, eval_path="", split="train"), tokenizer, 0) == key


@pytest.mark.slow
def test_rerun_and_resume_read_the_cache(tiny_llama, records_file, tmp_path, monkeypatch):
    """The second run (other steps, lr and output directory) and a resume never prepare; losses are the same."""
    import zerotune.data.prepare as prepare

    from zerotune.preflight import preflight

    cache_dir = str(tmp_path / "cache")
    config = make_config(tiny_llama, records_file, tmp_path / "one", **{
        "data.cache_dir": cache_dir, "train.max_steps": 4, "checkpoint.save_steps": 2})
    preflight(config)  # as the CLI does: records checked, then prepared, in this process
    first = train(config)

    def refuse(*args, **kwargs):
        raise AssertionError("the data was prepared again")

    monkeypatch.setattr(prepare, "prepare_uncached", refuse)
    monkeypatch.setattr(prepare, "load_training_records", refuse)  # not even read for the checks

    again = make_config(tiny_llama, records_file, tmp_path / "two", **{"data.cache_dir": cache_dir,
                                                                      "train.max_steps": 2})
    preflight(again)
    assert train(again).losses == first.losses[:2]
    from test_resume import interrupted_copy

    run_dir = interrupted_copy(tmp_path / "one", tmp_path / "resumed", 2)
    resumed = train(make_config(tiny_llama, records_file, run_dir, **{
        "data.cache_dir": cache_dir, "train.max_steps": 4, "checkpoint.save_steps": 2, "checkpoint.resume": True}))
    assert resumed.resumed_from == 2 and resumed.losses == first.losses


def _prepare_in_child(cache_dir: str, marker_dir: str, path: str, model: str, queue) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = DataConfig(path=path, cache_dir=cache_dir, eval_fraction=0.0)

    def prepare():
        (data_cache.Path(marker_dir) / f"prepared-{os.getpid()}").touch()
        time.sleep(1.0)  # long enough that the other process arrives while this one holds the lock
        return prepare_uncached(config, tokenizer, 0)

    data, hit = cached(config, tokenizer, 0, prepare)
    queue.put((hit, as_lists(data.train)))


@pytest.mark.slow
def test_one_process_prepares_while_the_others_wait(tiny_llama, records_file, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    markers = tmp_path / "markers"
    markers.mkdir()
    children = [context.Process(target=_prepare_in_child, args=(str(tmp_path / "cache"), str(markers),
                                                                str(records_file), str(tiny_llama), queue))
                for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert len(list(markers.iterdir())) == 1
    assert sorted(hit for hit, _ in results) == [False, True]
    assert results[0][1] == results[1][1]


def test_prepare_data_uses_the_cache_by_default(tiny_llama, records_file, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = DataConfig(path=str(records_file), cache_dir=str(tmp_path / "cache"))
    assert isinstance(prepare_data(config, tokenizer, 0).train, ExampleTable)
    assert isinstance(prepare_data(dataclasses.replace(config, cache=False), tokenizer, 0).train, list)
