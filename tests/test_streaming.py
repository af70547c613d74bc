"""--streaming: the stream's rows, their order against the map-style path, and exact resume (mid-shard, across a
shard boundary and a pass boundary, with and without packing, one and two workers).

Tolerances: as tests/test_resume.py, fp32 CPU on one worker count is bit-exact, so losses are compared with ==.
"""

import json
import subprocess

import pytest

from conftest import make_config, read_jsonl, write_jsonl
from helpers import losses_of, preempt_after_three_steps, train
from test_resume import cli, interrupted_copy
from zerotune.config import build_config
from zerotune.data.batches import BatchPlan
from zerotune.data.encode import EncodedExample, encode_records
from zerotune.data.packing import StreamPacker, packed_row
from zerotune.data.streaming import TrainingStream
from zerotune.errors import ConfigError, DataError
from zerotune.model import load_tokenizer
from zerotune.preflight import preflight

SHARD_SIZES = (10, 20, 9)  # 39 records; a step of 4 rows straddles the first boundary (records 9 to 12)


@pytest.fixture(scope="module")
def kept_records(alpaca_file, tiny_llama):
    """The 39 of the 48 records that max_seq_len 128 keeps (so that rows and records count alike)."""
    records = read_jsonl(alpaca_file)
    tokenizer = load_tokenizer(make_config(tiny_llama, alpaca_file, "unused").model)
    encoded, _ = encode_records(tokenizer, records, [""] * 48, "auto", 128, "truncate", keep_dropped=True)
    kept = [record for record, example in zip(records, encoded) if example is not None]
    assert len(kept) == sum(SHARD_SIZES)
    return kept


@pytest.fixture(scope="module")
def shards(kept_records, tmp_path_factory):
    """The 39 records in three JSONL shards of uneven size."""
    folder, start = tmp_path_factory.mktemp("shards"), 0
    for index, size in enumerate(SHARD_SIZES):
        write_jsonl(folder / f"train-{index:05d}.jsonl", kept_records[start:start + size])
        start += size
    return folder


def stream_config(model, data, out, **overrides):
    return make_config(model, data, out, **{"data.streaming": True, "train.max_steps": 14,
                                            "checkpoint.save_steps": 1, "checkpoint.keep": 20, **overrides})


def rows(stream, count):
    taken = []
    for _ in range(count):
        [[row]] = stream.micro_batches(1, 1)
        taken.append((row.input_ids, row.labels, row.position_ids, stream.position()))
    return taken


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_stream_resumes_from_any_row(packing, world_size, shards, tiny_llama, tmp_path):
    """Each worker's stream, resumed from the position after a row (a JSON round trip, as a checkpoint holds it),
    continues with exactly the rows that followed: mid-shard, at and across shard ends, into the second pass."""
    config = make_config(tiny_llama, shards, tmp_path, **{"data.streaming": True, "data.packing": packing,
                                                          "train.max_steps": 1}).data
    tokenizer = load_tokenizer(make_config(tiny_llama, shards, tmp_path).model)
    total = 25 if packing else 50  # past the end of the first pass either way
    for rank in range(world_size):
        stream = TrainingStream(config, tokenizer, rank, world_size, rows_per_step=4)
        expected = rows(stream, total)
        stream.close()
        for after in (0, 4, 9, 10, total // 2, total - 6):
            resumed = TrainingStream(config, tokenizer, rank, world_size, rows_per_step=4)
            resumed.resume(json.loads(json.dumps(expected[after][3])))
            got = rows(resumed, 5)
            resumed.close()
            assert [row[:3] for row in got] == [row[:3] for row in expected[after + 1:after + 6]], (rank, after)
    if not packing and world_size == 1:  # every record once a pass, in shard order, then the next pass
        records = [record for shard in sorted(shards.iterdir()) for record in read_jsonl(shard)]
        encoded, _ = encode_records(tokenizer, records, [""] * 39, "auto", 128, "truncate")
        assert [row[0] for row in expected] == [example.input_ids for example in encoded + encoded[:11]]


def test_stream_packer_fills_first_fit_and_closes_the_oldest():
    def example(length):
        return EncodedExample(list(range(1, length + 1)), list(range(1, length + 1)))

    packer = StreamPacker(10, open_limit=2)
    a, b, c, d = example(6), example(5), example(4), example(7)
    assert packer.add(a) is None and packer.add(b) is None  # two open rows: [a], [b]
    assert packer.add(c) is None  # fits with a: [a, c], [b]
    closed = packer.add(d)  # fits neither, two rows open: the oldest closes
    assert closed.input_ids == packed_row([a, c]).input_ids and closed.position_ids == [*range(6), *range(4)]
    assert closed.labels[0] == -100 and closed.labels[6] == -100
    assert [[len(m.input_ids) for m in row] for row in packer.snapshot()] == [[5], [7]]


@pytest.mark.slow
def test_streaming_matches_the_map_style_path(kept_records, tiny_llama, tmp_path):
    """One shard, one worker: the map-style run over the records placed where its seeded order reads them in file
    order trains on the same batches as the stream, so its per-step losses are the stream's."""
    order = BatchPlan(39, 4, 1, 1, 0).epoch_order(0)
    placed = [None] * 39
    for position, index in enumerate(order):
        placed[index] = kept_records[position]
    mapped = write_jsonl(tmp_path / "placed.jsonl", placed)
    evaluation = {"data.eval_path": str(write_jsonl(tmp_path / "eval.jsonl", kept_records[:6])), "train.eval_every": 3,
                  "train.max_steps": 6}
    expected = train(make_config(tiny_llama, mapped, tmp_path / "map", **evaluation))
    in_order = write_jsonl(tmp_path / "in_order.jsonl", kept_records)
    streamed = train(make_config(tiny_llama, in_order, tmp_path / "stream", **evaluation, **{"data.streaming": True}))
    assert streamed.losses == expected.losses
    assert len(streamed.eval_losses) == 3 and streamed.eval_losses == expected.eval_losses  # --eval-data, read whole


@pytest.fixture(scope="module")
def uninterrupted(shards, tiny_llama, tmp_path_factory):
    runs = {}
    for packing in (False, True):
        out = tmp_path_factory.mktemp("stream") / "run"
        runs[packing] = out, train(stream_config(tiny_llama, shards, out, **{"data.packing": packing,
                                                                             "adapter.dropout": 0.1}))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("step", [2, 3, 10], ids=["mid_shard", "across_shard_end", "second_pass"])
def test_streaming_resume_is_exact(step, packing, uninterrupted, shards, tiny_llama, tmp_path):
    """14 steps of 4 rows over 39 records: step 2 stops mid-shard, step 3's rows straddle the first shard's end,
    step 10's the end of the first pass (unpacked). LoRA dropout 0.1: the RNG state matters too."""
    out, expected = uninterrupted[packing]
    position = json.loads((out / "checkpoints" / f"step-{step:08d}" / "data-rank-0.json").read_text())
    assert position["records_read"] > 0 and position["world_size"] == 1
    run_dir = interrupted_copy(out, tmp_path / "run", step)
    settings = {"data.packing": packing, "adapter.dropout": 0.1, "checkpoint.resume": True}
    result = train(stream_config(tiny_llama, shards, run_dir, **settings))
    assert result.resumed_from == step
    assert result.losses == expected.losses


@pytest.mark.slow
def test_stream_positions_count_the_records(uninterrupted):
    out, _ = uninterrupted[False]
    where = {}
    for step in (2, 3, 10):
        position = json.loads((out / "checkpoints" / f"step-{step:08d}" / "data-rank-0.json").read_text())
        where[step] = (position["pass"], position["records_read"], position["records_in_pass"])
    # 4 records a step; after 40, the first of the second pass (39 records a pass)
    assert where == {2: (0, 8, 8), 3: (0, 12, 12), 10: (1, 40, 1)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_parquet_stream_resumes_from_every_record(world_size, kept_records, tiny_llama, tmp_path):
    """Parquet shards of row groups of 4 records: the reader reads a group at a time, yet a resume from the
    position after any record continues with the very next one (datasets' state counts within the group)."""
    import pyarrow
    import pyarrow.parquet as parquet

    for index, start in enumerate((0, 17)):
        table = pyarrow.Table.from_pylist([{k: r[k] for k in ("instruction", "input", "output")}
                                           for r in kept_records[start:start + 17]])
        parquet.write_table(table, tmp_path / f"part-{index}.parquet", row_group_size=4)
    config = make_config(tiny_llama, tmp_path, tmp_path / "out", **{"data.streaming": True}).data
    tokenizer = load_tokenizer(make_config(tiny_llama, tmp_path, tmp_path).model)
    for rank in range(world_size):
        stream = TrainingStream(config, tokenizer, rank, world_size, rows_per_step=4)
        expected = rows(stream, 40 // world_size)
        stream.close()
        for after in range(0, len(expected) - 3):
            resumed = TrainingStream(config, tokenizer, rank, world_size, rows_per_step=4)
            resumed.resume(json.loads(json.dumps(expected[after][3])))
            got = rows(resumed, 3)
            resumed.close()
            assert [row[0] for row in got] == [row[0] for row in expected[after + 1:after + 4]], (rank, after)


def test_streaming_settings_are_checked(tiny_llama, alpaca_file, tmp_path):
    def build(**overrides):
        return make_config(tiny_llama, alpaca_file, tmp_path, **{"data.streaming": True, **overrides})

    with pytest.raises(ConfigError, match="stream's length is unknown.*--max-steps"):
        build(**{"train.max_steps": 0})
    with pytest.raises(ConfigError, match="train.epochs: not used with --streaming"):
        build(**{"train.epochs": 2.0})
    with pytest.raises(ConfigError, match="holds nothing out.*--eval-fraction 0.*--eval-data"):
        build(**{"data.eval_fraction": 0.1})
    with pytest.raises(ConfigError, match="data.mix: mixtures do not stream"):
        build(**{"data.mix": [str(alpaca_file)], "data.path": ""})
    assert build(**{"data.eval_fraction": 0.1, "data.eval_path": str(alpaca_file)}).data.streaming
    assert not build_config({}).data.streaming


def test_streaming_preflight_errors(tiny_llama, tmp_path):
    def check(path):
        preflight(make_config(tiny_llama, path, tmp_path / "out", **{"data.streaming": True}))

    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        check(tmp_path / "missing.jsonl")
    (tmp_path / "train.csv").write_text("instruction,output\nhi,there\n")
    with pytest.raises(DataError, match="--streaming reads .jsonl, .json or .parquet shards"):
        check(tmp_path / "train.csv")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "hi", "answer": "no output field"}])
    with pytest.raises(DataError, match='record 1: missing field "output"'):
        check(bad)


@pytest.mark.slow
def test_streaming_sigterm_then_resume_matches(shards, tiny_llama, tmp_path):
    """A real interruption through the command line: SIGTERM mid-run checkpoints, --resume continues the stream."""
    def args(out):
        return ["--model", tiny_llama, "--data", shards, "--output-dir", out, "--max-steps", 16, "--batch-size", 4,
                "--dtype", "fp32", "--max-seq-len", 128, "--eval-fraction", 0, "--lr", "1e-2", "--seed", 0,
                "--tracking", "none", "--quiet", "--save-steps", 2, "--streaming", "--packing"]

    reference = tmp_path / "reference"
    subprocess.run(cli(*args(reference)), check=True, capture_output=True)
    out = tmp_path / "run"
    process = subprocess.Popen(cli(*args(out)), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    preempt_after_three_steps(process, out, 16)
    subprocess.run(cli(*args(out), "--resume"), check=True, capture_output=True)
    assert losses_of(out) == losses_of(reference)


@pytest.mark.slow
def test_streaming_two_workers_resume_is_exact(shards, tiny_llama, tmp_path):
    """DDP on 2 CPU workers, 3 shards (not divisible by 2: each worker reads every other record), packed; resumed
    after step 3 with the two workers' own positions, the losses are the uninterrupted run's."""
    settings = {"train.max_steps": 6, "train.batch_size": 2, "train.grad_accum": 2, "checkpoint.save_steps": 3,
                "distributed.num_workers": 2, "distributed.use_cpu": True, "distributed.strategy": "ddp",
                "data.packing": True, "adapter.dropout": 0.1}
    expected = train(stream_config(tiny_llama, shards, tmp_path / "full", **settings))
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000003"
    positions = [json.loads((checkpoint / f"data-rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert positions[0]["dataset"] != positions[1]["dataset"]
    run_dir = interrupted_copy(tmp_path / "full", tmp_path / "resumed", 3)
    result = train(stream_config(tiny_llama, shards, run_dir, **settings, **{"checkpoint.resume": True}))
    assert result.resumed_from == 3 and result.losses == expected.losses


def test_a_stream_with_nothing_to_train_on_stops(tiny_llama, tmp_path):
    """Every record longer than --max-seq-len with --overlong drop: one line, not a reader looping for ever."""
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 50, "output": "x"}] * 3)
    config = make_config(tiny_llama, data, tmp_path, **{"data.streaming": True, "data.max_seq_len": 16,
                                                        "data.overlong": "drop"})
    stream = TrainingStream(config.data, load_tokenizer(config.model), 0, 1, rows_per_step=4)
    with pytest.raises(DataError, match=r"no example that fits --max-seq-len 16 \(3 records\)"):
        stream.micro_batches(4, 1)
    stream.close()


def test_a_hub_stream_that_cannot_open_is_one_line(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = make_config(tiny_llama, "no-such-org/no-such-dataset", tmp_path, **{"data.streaming": True})
    with pytest.raises(DataError, match=r"cannot stream 'no-such-org/no-such-dataset' \(split 'train'\): .*--split"):
        preflight(config)


def test_streaming_cli_errors_and_worker_count_on_resume(tiny_llama, alpaca_file, tmp_path, capsys):
    from test_resume import fake_checkpoint
    from zerotune.checkpoints import check_resumable
    from zerotune.cli import main

    args = ["train", "--model", str(tiny_llama), "--data", str(alpaca_file), "--tracking", "none", "--streaming",
            "--output-dir", str(tmp_path / "cli")]
    assert main(args) == 2
    assert "the stream's length is unknown, so give the run a length with --max-steps" in capsys.readouterr().err
    config = make_config(tiny_llama, alpaca_file, tmp_path / "run", **{"data.streaming": True,
                                                                       "distributed.use_cpu": True})
    fake_checkpoint(tmp_path / "run", config, 2, streaming=True, world_size=2, global_batch_size=4)
    two = make_config(tiny_llama, alpaca_file, tmp_path / "run", **{
        "data.streaming": True, "distributed.use_cpu": True, "checkpoint.resume": True, "train.batch_size": 2,
        "distributed.num_workers": 2})
    assert check_resumable(two, tmp_path / "run")
    one = make_config(tiny_llama, alpaca_file, tmp_path / "run", **{
        "data.streaming": True, "distributed.use_cpu": True, "checkpoint.resume": True})
    with pytest.raises(ConfigError, match="stream was split between 2 workers.*--num-workers 2"):
        check_resumable(one, tmp_path / "run")
