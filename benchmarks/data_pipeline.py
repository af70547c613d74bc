"""The data pipeline's cold and warm preparation against the floor, on this machine (CPU only, no accelerator).

Writes a synthetic Alpaca-like JSONL (lengths lognormal, median about 150 tokens with the tokenizer below;
words drawn Zipf-like from a 60k-word lexicon), trains a 32k byte-level BPE tokenizer on it with ``tokenizers``
(zerotune.tiny.save_tiny_model: the tokenizer plus a 2-layer Llama beside it, so zerotune can load the folder),
then measures, each in a fresh subprocess whose peak RSS is read with resource.getrusage:

- floor: datasets.load_dataset("json") + one batched ``.map`` (the same fast tokenizer, the same Alpaca
  template, prompt labels -100, EOS appended, num_proc=2), no cache reuse;
- cold_prepare: zerotune's own preparation as preflight runs it (check_data, load_tokenizer, prepare_data) with
  an empty data cache: the prepared data written to the cache and mapped back;
- cold_train: ``zerotune train --max-steps 1 --num-workers 2 --use-cpu`` (two CPU workers, DDP) from command start
  to exit (one step on the tiny model, adapter saved) with an empty data cache;
- warm_train: the same command again, the data cache now filled (a cache hit).

For the train commands, the peak RSS (VmHWM) of the launching process, of each of the two workers and of every
other process they start (datasets' map workers, forked from the launcher) is sampled from /proc every 0.1 s.

Usage: python benchmarks/data_pipeline.py --out DIR --records N [--result FILE] [--src OTHER_CHECKOUT/src]
       [--skip cold_prepare] [--floor-last] [--commit SHA]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's zerotune, also where another one is installed
MAX_SEQ_LEN = 1024
VOCAB = 32000
TOKENIZER_RECORDS = 100_000  # the tokenizer is trained on the first records only, the same at every size


def write_records(path: Path, count: int, seed: int = 0) -> None:
    """Alpaca-like records: instruction, optional input (40%), output; body lengths lognormal."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(60_000)])
    weights = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.05
    weights /= weights.sum()
    # median 56 words: about 150 tokens per example with the template and the 32k tokenizer below
    lengths = rng.lognormal(mean=np.log(56), sigma=0.6, size=count).clip(8, 1500).astype(int)
    with path.open("w", encoding="utf-8") as handle:
        for start in range(0, count, 10_000):
            block = lengths[start:start + 10_000]
            drawn = iter(lexicon[rng.choice(len(lexicon), size=int(block.sum()), p=weights)].tolist())
            for words in block.tolist():
                instruction_words = max(3, words // 4)
                has_input = rng.random() < 0.4
                input_words = words // 6 if has_input else 0
                output_words = max(1, words - instruction_words - input_words)

                def text(n: int) -> str:
                    return " ".join(next(drawn) for _ in range(n))

                record = {"instruction": text(instruction_words).capitalize() + "?",
                          "input": text(input_words) if has_input else "", "output": text(output_words) + "."}
                handle.write(json.dumps(record) + "\n")


def build_model(out: Path, data: Path) -> Path:
    from zerotune.tiny import save_tiny_model

    model_dir = out / "model"
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    texts = []
    with data.open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(TOKENIZER_RECORDS)):
            record = json.loads(line)
            texts.append(" ".join((record["instruction"], record["input"], record["output"])))
    save_tiny_model(model_dir, texts, "llama", vocab_size=VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2,
                    seed=0)
    return model_dir


# ---- measurements, each run in a fresh process (--measure) ----

def measure_floor(data: Path, model_dir: Path, work: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from zerotune.data.templates import ALPACA

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id

    def encode(batch):
        prompts = [ALPACA.render_prompt(i, x or "") for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        ids = [(p + r + [eos])[:MAX_SEQ_LEN] for p, r in zip(prompt_ids, response_ids)]
        labels = [([-100] * len(p) + r + [eos])[:MAX_SEQ_LEN] for p, r in zip(prompt_ids, response_ids)]
        return {"input_ids": ids, "labels": labels}

    started = time.perf_counter()
    table = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    loaded = time.perf_counter() - started
    table = table.map(encode, batched=True, num_proc=2, remove_columns=table.column_names)
    return {"seconds": time.perf_counter() - started, "load_seconds": loaded, "examples": len(table),
            "median_tokens": sorted(len(row) for row in table["input_ids"][: 20_000])[min(len(table), 20_000) // 2]}


def measure_prepare(data: Path, model_dir: Path, work: Path) -> dict:
    from zerotune.config import build_config
    from zerotune.data.prepare import check_data, prepare_data
    from zerotune.model import load_tokenizer

    config = build_config({"model.name": str(model_dir), "data.path": str(data), "data.template": "alpaca",
                           "data.eval_fraction": 0.0, "data.max_seq_len": MAX_SEQ_LEN,
                           "data.cache_dir": str(work / "cache"), "output.dir": str(work / "unused")})
    started = time.perf_counter()
    check_data(config.data, config.train.seed)
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_data(config.data, tokenizer, config.train.seed)
    return {"seconds": time.perf_counter() - started, "examples": len(prepared.train),
            "report": prepared.report.summary()}


def train_command(data: Path, model_dir: Path, work: Path, output: str) -> list[str]:
    return [sys.executable, "-m", "zerotune", "train", "--model", str(model_dir), "--data", str(data),
            "--template", "alpaca", "--eval-fraction", "0", "--max-seq-len", str(MAX_SEQ_LEN),
            "--data-cache-dir", str(work / "cache"), "--max-steps", "1", "--batch-size", "1", "--use-cpu",
            "--dtype", "fp32", "--tracking", "none", "--output-dir", str(work / output), "--num-workers", "2"]


def _proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as handle:
        return handle.read().decode(errors="replace")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_proc(int(entry), "stat").rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def classify(pid: int, parent: int, command: str, root: int) -> str:
    """torch elastic spawns the workers from the launcher with multiprocessing; datasets' pools (save_to_disk)
    use multiprocess (dill's fork of it), and its map forks the launcher."""
    if pid == root:
        return "launcher"
    return "worker" if parent == root and "from multiprocessing.spawn import" in command else "helper"


def role_summary(processes: list[dict]) -> dict:
    by_role = {role: sorted((p for p in processes if p["role"] == role), key=lambda p: -p["peak_rss_mib"])
               for role in ("launcher", "worker", "helper")}
    return {"launcher_peak_rss_mib": by_role["launcher"][0]["peak_rss_mib"] if by_role["launcher"] else None,
            "worker_peak_rss_mib": [p["peak_rss_mib"] for p in by_role["worker"]],
            "largest_helper_peak_rss_mib": max((p["peak_rss_mib"] for p in by_role["helper"]), default=None),
            "processes": processes}


class PeakSampler(threading.Thread):
    """The last seen VmHWM (peak RSS) of every process below ``root``, sampled until stopped. A process's role:
    launcher (root), worker (torch elastic's), or helper (anything else: datasets' map and save_to_disk
    processes, of which a fork counts the pages it shares with the launcher; multiprocessing's resource trackers)."""

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval, self.stop = root, interval, threading.Event()
        self.peaks: dict[int, dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in descendants(self.root):
                try:
                    hwm = next(int(line.split()[1]) for line in _proc(pid, "status").splitlines()
                               if line.startswith("VmHWM:"))
                    command = _proc(pid, "cmdline").replace("\0", " ").strip()
                    parent = int(_proc(pid, "stat").rsplit(")", 1)[1].split()[1])
                except (OSError, StopIteration, IndexError, ValueError):
                    continue
                role = classify(pid, parent, command, self.root)
                seen = self.peaks.setdefault(pid, {"role": role, "pid": pid, "parent": parent,
                                                   "command": command[:160], "peak_rss_mib": 0.0})
                seen["peak_rss_mib"] = max(seen["peak_rss_mib"], hwm / 1024)
            self.stop.wait(self.interval)

    def summary(self) -> dict:
        return role_summary(list(self.peaks.values()))


def measure_train(data: Path, model_dir: Path, work: Path, output: str) -> dict:
    command = train_command(data, model_dir, work, output)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = PeakSampler(process.pid)
    sampler.start()
    chunks, first_step = [], None
    while chunk := os.read(process.stderr.fileno(), 1 << 16):  # tqdm's step bar ends in \r, not a line
        chunks.append(chunk)
        if first_step is None and b"loss=" in b"".join(chunks[-2:]):
            first_step = time.perf_counter() - started  # the first step's loss is shown: it has run
    process.wait()
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    stderr = b"".join(chunks).decode(errors="replace")
    if process.returncode:
        raise SystemExit(f"zerotune train failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "seconds_to_first_step": first_step, "command": " ".join(command),
            **sampler.summary(),
            "log_tail": [line for line in stderr.splitlines() if "data " in line or "%|" not in line][-8:]}


MEASURES = {"floor": measure_floor, "cold_prepare": measure_prepare,
            "cold_train": lambda d, m, w: measure_train(d, m, w, "run-cold"),
            "warm_train": lambda d, m, w: measure_train(d, m, w, "run-warm")}


def cpu_seconds() -> dict:
    """User + system CPU time of this process and of the children it waited for: under a contended machine the
    wall-clock time varies run to run, the CPU time much less."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_seconds": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime}


def peak_rss_mib() -> dict:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss keeps the pre-exec peak of the process that
    spawned it, here the orchestrator) and the largest peak among the children it waited for (getrusage; a
    datasets num_proc worker is forked from this process, so its figure counts the pages it shares with it)."""
    with open("/proc/self/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    kib = 1024  # both in KiB on Linux
    return {"self_peak_rss_mib": hwm / kib,
            "largest_child_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def run_measure(name: str, data: Path, model_dir: Path, work: Path, src: Path) -> dict:
    """One measurement in a fresh interpreter, so its peak RSS is its own."""
    command = [sys.executable, __file__, "--measure", name, "--data", str(data), "--model", str(model_dir),
               "--work", str(work)]
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode:
        raise SystemExit(f"{name} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"{name}: {result['seconds']:.1f} s ({result['cpu_seconds']:.0f} CPU s), "
          f"peak RSS {result['self_peak_rss_mib']:.0f} MiB "
          f"(largest child {result['largest_child_peak_rss_mib']:.0f} MiB)", flush=True)
    return result


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    return {"cpu": model, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "uptime_at_start": uptime(), "nice": os.nice(0), "python": platform.python_version(),
            "platform": platform.platform()}


def versions() -> dict:
    import datasets
    import tokenizers
    import transformers

    return {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (data, tokenizer, caches)")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--result", type=Path,
                        help="results JSON (default: benchmarks/results/<date>-cpu-data-pipeline-<N>k.json)")
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="the zerotune source measured (another checkout's src, to compare commits in one run)")
    parser.add_argument("--note", default="", help="said in the results JSON, e.g. how busy the machine was")
    parser.add_argument("--floor-last", action="store_true",
                        help="measure the floor after zerotune (a run cut short keeps zerotune's numbers)")
    parser.add_argument("--commit", default="", help="the commit measured, when --src is an exported copy of it "
                                                     "(not a git checkout)")
    parser.add_argument("--skip", action="append", default=[], choices=["cold_prepare"],
                        help="leave out a measurement (cold_prepare: cold_train measures the same preparation)")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = MEASURES[args.measure](args.data, args.model, args.work)
        print(json.dumps({**result, **peak_rss_mib(), **cpu_seconds()}))
        return
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"alpaca-{args.records}.jsonl"
    if not data.is_file():
        t0 = time.perf_counter()
        write_records(data, args.records)
        print(f"wrote {data} in {time.perf_counter() - t0:.0f} s", flush=True)
    model_dir = build_model(args.out, data)
    work = args.out / f"work-{args.records}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    result_path = args.result or ROOT / "benchmarks" / "results" / (
        f"{started_at:%Y-%m-%d}-cpu-data-pipeline-{args.records // 1000}k.json")
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.src, capture_output=True,
                                           text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "."], cwd=args.src, capture_output=True,
                                text=True).stdout.strip())
    results = {}

    def write(complete: bool) -> dict:
        """The results so far (after each measurement: a run stopped early keeps what it measured)."""
        ratio = lambda name, key: (results[name][key] / results["floor"][key]  # noqa: E731
                                   if name in results and "floor" in results else None)
        summary = {
            "benchmark": "data_pipeline", "complete": complete, "date": started_at.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "src_dirty": dirty,
            "machine": {**load_at_start, "load_average_at_end": os.getloadavg(), "uptime_at_end": uptime()},
            "versions": versions(), "note": args.note,
            "command": f"python3 benchmarks/data_pipeline.py --out {args.out} --records {args.records}"
                       + (f" --src {args.src}" if args.src != ROOT / "src" else "")
                       + (" --floor-last" if args.floor_last else "")
                       + "".join(f" --skip {name}" for name in args.skip),
            "commit_measured_is_of": str(args.src),
            "records": args.records, "data_bytes": data.stat().st_size, "vocab_size": VOCAB,
            "max_seq_len": MAX_SEQ_LEN, "median_tokens_per_example": results.get("floor", {}).get("median_tokens"),
            "cold_prepare_over_floor": ratio("cold_prepare", "seconds"),
            "cold_prepare_over_floor_cpu": ratio("cold_prepare", "cpu_seconds"),
            "cold_train_over_floor": ratio("cold_train", "seconds"),
            "cold_train_over_floor_cpu": ratio("cold_train", "cpu_seconds"),
            "cold_first_step_seconds": results.get("cold_train", {}).get("seconds_to_first_step"),
            "warm_first_step_seconds": results.get("warm_train", {}).get("seconds_to_first_step"),
            "peak_rss_mib": {name: {key: results[name][key] for key in
                                    ("launcher_peak_rss_mib", "worker_peak_rss_mib", "largest_helper_peak_rss_mib")}
                             for name in ("cold_train", "warm_train") if name in results},
            "results": results,
        }
        result_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    if not args.floor_last:
        results["floor"] = run_measure("floor", data, model_dir, work, args.src)
        write(False)
    if "cold_prepare" not in args.skip:
        results["cold_prepare"] = run_measure("cold_prepare", data, model_dir, work, args.src)
        write(False)
        shutil.rmtree(work / "cache")  # cold again for the train command
    results["cold_train"] = run_measure("cold_train", data, model_dir, work, args.src)
    write(False)
    results["warm_train"] = run_measure("warm_train", data, model_dir, work, args.src)
    if args.floor_last:
        write(False)
        results["floor"] = run_measure("floor", data, model_dir, work, args.src)
    summary = write(True)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    print(f"wrote {result_path}")


if __name__ == "__main__":
    main()
