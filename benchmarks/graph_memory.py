"""What is alive at a run's peak GPU memory, by the source line that allocated it, with and without
``train.cuda_graph``. One GPU, a `zerotune bench` workload's model and data (default: qlora, where the graphed run
peaked 0.12 GiB higher).

Each run trains with the allocator's history recorded (Python stacks); the trace is replayed to find the moment of
peak allocated bytes and the blocks alive then, grouped by the innermost frame in zerotune, transformers, peft,
bitsandbytes or torch (inductor's generated code names the frame that called it).

Usage: python benchmarks/graph_memory.py --out DIR [--workload qlora] [--steps 6] [--no-stacks]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

PACKAGES = ("zerotune/", "transformers/", "peft/", "bitsandbytes/", "torch/")


def where(frames: list[dict]) -> str:
    """The innermost frame in a package we know, plus the innermost zerotune frame around it."""
    inner = next((f for f in frames if any(p in f["filename"] for p in PACKAGES)), frames[0] if frames else None)
    ours = next((f for f in frames if "zerotune/" in f["filename"]), None)
    def name(f):
        return f"{f['filename'].split('site-packages/')[-1].split('/src/')[-1]}:{f['line']}:{f['name']}" if f else "?"
    return name(inner) + ("" if ours is None or ours is inner else " < " + name(ours))


def peak_report(trace: list[dict]) -> dict:
    sizes, current, peak, peak_index = {}, 0, 0, -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            sizes[event["addr"]] = event["size"]
            current += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in sizes:
            current -= sizes.pop(event["addr"])
        if current > peak:
            peak, peak_index = current, index
    live = {}
    for event in trace[:peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    groups = defaultdict(int)
    for event in live.values():  # without recorded stacks: by block size (and how many such blocks)
        groups[where(event["frames"]) if event.get("frames") else f"{event['size'] / 2**20:.2f} MiB blocks"] += event["size"]
    top = sorted(groups.items(), key=lambda item: -item[1])[:30]
    at_peak = trace[peak_index]
    return {"peak_gib_in_trace": peak / 2**30, "peak_event": peak_index, "events": len(trace),
            "peak_allocation_stack": [where([f]) for f in at_peak.get("frames", [])[:12]],
            "live_by_source_gib": {key: round(size / 2**30, 4) for key, size in top}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", default="qlora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-stacks", action="store_true")
    args = parser.parse_args()
    from zerotune.bench import ARCHITECTURES, WORKLOADS, provenance, run_config, token_records, write_model_dir
    from zerotune.bench.harness import run_ours

    workload = WORKLOADS[args.workload]
    arch = ARCHITECTURES[workload.architecture]
    work = Path(tempfile.mkdtemp(prefix="zerotune-graph-memory-"))
    model_dir = write_model_dir(work / "model", arch, torch.bfloat16, saved_weights=workload.method == "qlora", seed=0)
    data = work / "data.jsonl"
    records = token_records(workload, arch["vocab_size"], args.steps * workload.micro_batch, 0)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {**provenance(f"python benchmarks/graph_memory.py --workload {args.workload} --steps {args.steps}"
                             + (" --no-stacks" if args.no_stacks else "")),
              "workload": args.workload, "runs": {}}
    for graphed in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # Python stacks crashed a checkpointed compiled backward (SystemError in autograd's apply, torch 2.11), so
        # --no-stacks records sizes only.
        torch.cuda.memory._record_memory_history(max_entries=10_000_000, stacks="python",
                                                 context=None if args.no_stacks else "all")
        config = run_config(workload, model_dir, data, work / f"run-{graphed}", args.steps, False, 0,
                            {"train.cuda_graph": graphed})
        ours = run_ours(config, 2, 1)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        report = peak_report(snapshot["device_traces"][0])
        report["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["run_peak_gib"] = ours["peak_gib"]
        result["runs"]["graphed" if graphed else "op-by-op"] = report
        print(json.dumps(report, indent=1), flush=True)
    plain, graphed = (result["runs"][k]["live_by_source_gib"] for k in ("op-by-op", "graphed"))
    result["graphed_minus_op_by_op_gib"] = {k: round(graphed.get(k, 0) - plain.get(k, 0), 4)
                                            for k in set(plain) | set(graphed)
                                            if abs(graphed.get(k, 0) - plain.get(k, 0)) > 0.001}
    print(json.dumps(result["graphed_minus_op_by_op_gib"], indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"graph-memory-{args.workload}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
