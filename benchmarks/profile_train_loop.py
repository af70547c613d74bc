"""Where the training loop's step time goes on a `zerotune bench` workload, one GPU: runs our side of the
workload (the real `zerotune train` loop, as `zerotune bench` does) and profiles a few steps in the middle of
the run with torch.profiler: kernel time by group (GEMM, attention, other), idle time (wall minus kernels) and
the top kernels. `w1_variants.py` profiles the bare step outside the loop; the difference between the two is
what the loop adds.

Usage: python benchmarks/profile_train_loop.py --out DIR [--workload w2] [--steps 12] [--profile-steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", default="w2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled, ending two before the last")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from w1_variants import group_of
    from zerotune import bench
    from zerotune.launchers import launch
    from zerotune.speed.step_graphs import StepGraphs
    from zerotune.run_dir import prepare_output_dir

    workload = bench.WORKLOADS[args.workload]
    arch = bench.ARCHITECTURES[workload.architecture]
    work = Path(tempfile.mkdtemp(prefix="zerotune-profile-"))
    model_dir = bench.write_model_dir(work / "model", arch, torch.bfloat16, saved_weights=False, seed=0)
    data = work / "data.jsonl"
    records = bench.token_records(workload, arch["vocab_size"], args.steps * workload.micro_batch, 0)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = bench.run_config(workload, model_dir, data, work / "ours", args.steps, False, 0, {})
    prepare_output_dir(Path(config.output.dir), overwrite=True)

    start = args.steps - 2 - args.profile_steps  # the step calls (0-based) profiled: [start, start + n)
    state = {"calls": 0}
    profiler = profile(activities=[ProfilerActivity.CUDA])
    real_call = StepGraphs.__call__

    def call(self, *call_args, **kwargs):
        if state["calls"] == start:
            torch.cuda.synchronize()
            profiler.__enter__()
            state["wall"] = time.perf_counter()
        outcome = real_call(self, *call_args, **kwargs)
        state["calls"] += 1
        if state["calls"] == start + args.profile_steps:
            torch.cuda.synchronize()
            state["wall"] = (time.perf_counter() - state["wall"]) / args.profile_steps
            profiler.__exit__(None, None, None)
        return outcome

    StepGraphs.__call__ = call
    launch(config, show_progress=False)
    if "wall" not in state or state["calls"] < start + args.profile_steps:
        sys.exit(f"only {state['calls']} step calls went through step graphs; nothing profiled")

    groups, kernels = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, []
    for event in profiler.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            ms = event.self_device_time_total / args.profile_steps / 1e3
            groups[group_of(event.key)] += ms
            kernels.append((event.key[:110], round(ms, 3)))
    kernels.sort(key=lambda kv: -kv[1])
    events = [json.loads(line) for line in (Path(config.output.dir) / "metrics.jsonl").read_text().splitlines()]
    seconds = [e["step_seconds"] for e in events if "step_seconds" in e]
    result = {**bench.provenance("python benchmarks/profile_train_loop.py " + " ".join(sys.argv[1:])),
              "workload": args.workload, "step_ms": [round(s * 1e3, 2) for s in seconds],
              "profiled_wall_ms": round(state["wall"] * 1e3, 2),
              "kernel_ms": {k: round(v, 2) for k, v in groups.items()},
              "idle_ms": round(state["wall"] * 1e3 - sum(groups.values()), 2), "top_kernels_ms": kernels[:40]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile-train-loop-{args.workload}.json").write_text(json.dumps(result, indent=1))
    print({k: result[k] for k in ("profiled_wall_ms", "kernel_ms", "idle_ms")}, result["step_ms"][-6:])


if __name__ == "__main__":
    main()
