"""Prints the README's `zerotune bench` table from benchmarks/results/*.json (files that `zerotune bench` wrote).

Usage: python scripts/bench_table.py
"""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def bench_results() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        # an "experiment" file ran code that is not in the repository (its field says what): no command to rerun
        if {"workload", "ours", "baseline", "ratio", "command"} <= result.keys() and "experiment" not in result:
            found.append((path.name, result))
    return found


def shown_command(command: str) -> str:
    """The command without the machine's own paths (--out-dir, --work-dir and their values)."""
    words, kept = command.split(), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--out-dir", "--work-dir"):
            skip = True
        elif not word.startswith(("--out-dir=", "--work-dir=")):
            kept.append(word)
    return " ".join(kept)


def step_spread(side: dict) -> str:
    """The baseline's 90th-percentile step time over its 10th (zerotune.bench.spread): a baseline whose steps
    wander (a noisy host: 1.15-1.25 on some H200 machines, where steady W1/W2 runs show 1.00-1.04) makes the
    ratio overstate ours. W3's steps differ by design (their lengths vary). '-' for files without step times."""
    from zerotune.bench import spread

    steps = side.get("step_seconds")
    return f"{spread(steps):.2f}" if steps else "-"


def table() -> str:
    lines = ["| workload | GPU | HF+PEFT tok/s (per GPU) | HF step spread | zerotune tok/s (per GPU) | ratio | "
             "LoRA-MFU ours | peak GiB HF / ours | commit | command | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in bench_results():
        ours, base = r["ours"], r["baseline"]
        mfu = f"{ours['lora_mfu']:.1%}" if ours.get("lora_mfu") else "-"
        gpu = r["gpu"].replace("NVIDIA ", "") + (f" x{r['gpus']}" if r.get("gpus", 1) > 1 else "")
        command = shown_command(r["command"])
        lines.append(f"| {r['workload']} | {gpu} | {base['tokens_per_second_per_gpu']:,.0f} | {step_spread(base)} | "
                     f"{ours['tokens_per_second_per_gpu']:,.0f} | **{r['ratio']:.2f}x** | {mfu} | "
                     f"{base['peak_gib']:.1f} / {ours['peak_gib']:.1f} | {r['commit'][:7]} | `{command}` | `{name}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
