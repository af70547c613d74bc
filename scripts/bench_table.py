"""Benchmark tables from benchmarks/results/*.json.

    python3 scripts/bench_table.py                                 # the README's headline: one row per workload
    python3 scripts/bench_table.py --all > docs/benchmarks-all.md  # the docs page: a row per results file

The headline row of a workload is its newest `zerotune bench` run of the default configuration: no
`section.key=value` override in the command, no `caveat` or `experiment` field in the file. "Newest" is the
file's date, then its commit's time in this repository's history, then its run number (`-run2`, `-repeat`).
tests/test_readme.py and tests/test_docs.py check that the README and the docs page equal this output.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH_FIELDS = {"workload", "ours", "baseline", "ratio", "command"}
# Flags whose values are a machine's own paths: not shown.
PATH_FLAGS = ("--out-dir", "--work-dir")


def all_results() -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in sorted(RESULTS.glob("*.json"))]


def is_bench(result: dict) -> bool:
    # an "experiment" file ran code that is not in the repository (its field says what): no command to rerun
    return BENCH_FIELDS <= result.keys() and "experiment" not in result


def is_pairs(result: dict) -> bool:
    """A `zerotune bench dpo` run: zerotune against TRL's DPOTrainer in pairs/s (no HF+PEFT baseline)."""
    return result.get("metric") == "pairs/s" and "trl" in result.get("peers", {})


def bench_results() -> list[tuple[str, dict]]:
    return [(name, result) for name, result in all_results() if is_bench(result)]


def shown_command(command: str) -> str:
    """The command without the machine's own paths: --out-dir and --work-dir dropped, --out's value as DIR."""
    words, kept = command.split(), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in PATH_FLAGS:
            skip = True
        elif word.startswith(tuple(f"{flag}=" for flag in PATH_FLAGS)):
            continue
        elif kept and kept[-1] == "--out":
            kept.append("DIR")
        else:
            kept.append(word)
    return " ".join(kept)


def is_default_run(result: dict) -> bool:
    """A `zerotune bench` run of the workload as it ships: no override in the command, no caveat on the file."""
    overrides = [word for word in result["command"].split() if "=" in word and not word.startswith("--")]
    return not overrides and "caveat" not in result


def commit_times() -> dict[str, int]:
    """Full commit hash -> commit time, from git; empty outside a git checkout."""
    try:
        log = subprocess.run(["git", "log", "--format=%H %ct"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {commit: int(time) for commit, time in (line.split() for line in log.splitlines())}


def run_number(name: str) -> int:
    match = re.search(r"-run(\d+)", name)
    return int(match.group(1)) if match else 2 if "-repeat" in name else 1


def newest_key(name: str, result: dict, times: dict[str, int]) -> tuple:
    short = result["commit"][:7]
    commit_time = next((time for commit, time in times.items() if commit.startswith(short)), 0)
    return result["date"], commit_time, run_number(name), name


def headline_results() -> list[tuple[str, dict]]:
    """The newest default run of each workload, in workload order."""
    times, newest = commit_times(), {}
    for name, result in bench_results():
        if not is_default_run(result):
            continue
        current = newest.get(result["workload"])
        if current is None or newest_key(name, result, times) > newest_key(*current, times):
            newest[result["workload"]] = (name, result)
    return [newest[workload] for workload in sorted(newest)]


def step_spread(side: dict) -> str:
    """The baseline's 90th-percentile step time over its 10th (zerotune.bench.spread): a baseline whose steps
    wander (a noisy host: 1.15-1.25 on some H200 machines, where steady W1/W2 runs show 1.00-1.04) makes the
    ratio overstate ours. W3's steps differ by design (their lengths vary). '-' for files without step times."""
    from zerotune.bench import spread

    steps = side.get("step_seconds")
    return f"{spread(steps):.2f}" if steps else "-"


def gpu_name(result: dict) -> str:
    """The GPU a result ran on, or the machine it names (a CPU-only measurement such as checkpoint hashing)."""
    if "gpu" not in result:
        machine = result.get("machine", {})
        return f"CPU x{machine['cores']}" if isinstance(machine, dict) and "cores" in machine else "CPU"
    return result["gpu"].replace("NVIDIA ", "") + (f" x{result['gpus']}" if result.get("gpus", 1) > 1 else "")


def measured_peers(results: list[tuple[str, dict]]) -> list[str]:
    """The peers (`zerotune bench --baseline`) with figures in any of these results, in bench's order."""
    from zerotune.bench.peers import PEER_NAMES

    return [peer for peer in PEER_NAMES if any("ratio" in r.get("peers", {}).get(peer, {}) for _, r in results)]


def table(results: list[tuple[str, dict]], with_commit: bool = True) -> str:
    """One markdown row per results file; a column per peer measured in any of them (ours over the peer)."""
    when = "commit" if with_commit else "date"
    peers = measured_peers(results)
    lines = ["| workload | GPU | HF+PEFT tok/s (per GPU) | HF step spread | zerotune tok/s (per GPU) | ratio | "
             + "".join(f"ratio vs {peer} | " for peer in peers)
             + f"LoRA-MFU ours | peak GiB HF / ours | {when} | command | file |",
             "|---|---|---|---|---|---|" + "---|" * len(peers) + "---|---|---|---|---|"]
    for name, r in results:
        ours, base = r["ours"], r["baseline"]
        mfu = f"{ours['lora_mfu']:.1%}" if ours.get("lora_mfu") else "-"
        against = "".join(f"**{r['peers'][peer]['ratio']:.2f}x** | " if "ratio" in r.get("peers", {}).get(peer, {})
                          else "- | " for peer in peers)
        lines.append(f"| {r['workload']} | {gpu_name(r)} | {base['tokens_per_second_per_gpu']:,.0f} | "
                     f"{step_spread(base)} | {ours['tokens_per_second_per_gpu']:,.0f} | **{r['ratio']:.2f}x** | "
                     f"{against}{mfu} | {base['peak_gib']:.1f} / {ours['peak_gib']:.1f} | "
                     f"{r['commit'][:7] if with_commit else r['date']} | `{shown_command(r['command'])}` | "
                     f"`{name}` |")
    return "\n".join(lines)


def pair_table(results: list[tuple[str, dict]]) -> str:
    """One markdown row per `zerotune bench dpo` file: pairs/s of TRL's DPOTrainer and of zerotune, peak memory
    and both first losses (ln 2 = 0.693147 when both trained the same pairs from a new adapter)."""
    lines = ["| workload | GPU | TRL pairs/s | zerotune pairs/s | ratio | peak GiB TRL / ours | first loss TRL / ours "
             "| commit | command | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        ours, trl = r["ours"], r["peers"]["trl"]
        if "pairs_per_second" not in trl:  # TRL did not run: the file says why
            why = trl.get("not_available") or trl.get("error") or "-"
            lines.append(f"| {r['workload']} | {gpu_name(r)} | {why} | {ours['pairs_per_second']:.2f} | - | - | - | "
                         f"{r['commit'][:7]} | `{shown_command(r['command'])}` | `{name}` |")
            continue
        peaks = f"{trl['peak_gib']:.1f} / {ours['peak_gib']:.1f}" if ours.get("peak_gib") else "-"
        lines.append(f"| {r['workload']} | {gpu_name(r)} | {trl['pairs_per_second']:.2f} | "
                     f"{ours['pairs_per_second']:.2f} | **{trl['pairs_per_second_ratio']:.2f}x** | {peaks} | "
                     f"{trl['losses'][0]:.6f} / {ours['losses'][0]:.6f} | {r['commit'][:7]} | "
                     f"`{shown_command(r['command'])}` | `{name}` |")
    caveats = [f"- `{name}`: {r['caveat']}" for name, r in results if r.get("caveat")]
    return "\n".join(lines + (["", "Caveats, as each file states them:", "", *caveats] if caveats else []))


def headline_table() -> str:
    """The README's table: the newest default run of each workload, dated rather than by commit."""
    return table(headline_results(), with_commit=False)


def other_table() -> str:
    """Files written by the scripts in benchmarks/ (profiles, variants, engines): one row each."""
    lines = ["| date | GPU | commit | command | file |", "|---|---|---|---|---|"]
    for name, r in all_results():
        if is_bench(r) or is_pairs(r):
            continue
        command = shown_command(r.get("command") or "; ".join(r.get("commands", [])) or "-")
        lines.append(f"| {r['date']} | {gpu_name(r)} | {r['commit'][:7]} | `{command}` | `{name}` |")
    return "\n".join(lines)


def all_page() -> str:
    bench = bench_results()
    pairs = [(name, result) for name, result in all_results() if is_pairs(result)]
    pair_section = [
        f"## `zerotune bench dpo` runs ({len(pairs)})",
        "",
        "zerotune's DPO against TRL's DPOTrainer with PEFT in the same run, pairs per second.",
        "",
        pair_table(pairs),
        "",
    ] if pairs else []
    return "\n".join([
        "# Every benchmark run",
        "",
        "<!-- Generated by `python3 scripts/bench_table.py --all > docs/benchmarks-all.md`; do not edit. -->",
        "",
        f"Every file in `benchmarks/results/`, one row each ({len(all_results())} files). How these runs are made",
        "and how to read them: [Benchmarks](benchmarks.md).",
        "",
        f"## `zerotune bench` runs ({len(bench)})",
        "",
        "zerotune against the stock HF+PEFT path in the same run, oldest date first. Files with `-before-autocast`",
        "in the name were made without `model.mixed_precision`; `-repeat` and `-runN` files are further runs of",
        "the same command; a command with `section.key=value` changed zerotune's side.",
        "",
        table(bench),
        "",
        *pair_section,
        "## Other measurements",
        "",
        "Written by the scripts in `benchmarks/` (profiles, variants in one process, engines on several GPUs,",
        "70B runs, kernels alone). Each file holds its own description, settings and figures.",
        "",
        other_table(),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="print the docs page listing every results file")
    args = parser.parse_args()
    print(all_page() if args.all else headline_table(), end="" if args.all else "\n")


if __name__ == "__main__":
    main()
