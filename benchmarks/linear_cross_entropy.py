"""The cross-entropy of an output head, three ways: stock logits then cross-entropy, zerotune's chunked loss,
and torch's ``F.linear_cross_entropy`` (torch >= 2.13), on the same hidden states, head weight and labels.

Variants (each the summed loss over labels that are not -100, as the training loop takes it):
  stock                   F.linear, the logits upcast to fp32 (.float(); fp64 stays fp64), F.cross_entropy:
                          zerotune's path with --no-chunked-loss (step.token_loss_sum)
  zerotune                speed.chunked_loss.linear_cross_entropy_sum, default chunk (chunk_tokens_for(vocab)
                          label rows), the label count given as the loop gives it
  torch-reference         F.linear_cross_entropy with its default options=None: the reference path, full logits
  torch-chunked-auto      options=LinearCrossEntropyOptions(): acc_policy and chunk rows "auto", resolved per
                          device and dtype (the results file records what they resolved to)
  torch-chunked-same-rows batch_chunk_size = zerotune's chunk rows, acc_policy "auto": like for like chunks
The torch variants are left out where F.linear_cross_entropy does not exist (torch < 2.13).

Two cases: the head frozen (LoRA, QLoRA: gradient for the hidden states only) and trained (full
fine-tuning: the weight's gradient too).

Equality: in the main process, each variant's loss and gradients against the stock path on the same inputs
in fp64 (where every variant should agree to about 1e-12), and in --dtype against both the stock path in
--dtype and the fp64 stock path (the truth): relative difference of the loss, and of each gradient in norm
(||g - ref|| / ||ref||) and max abs.

Time and memory: each (variant, case) in a fresh subprocess, so one variant's allocations never count for
another: one warm-up call, then --repeats calls of forward+backward (gradients dropped between calls); the
median is reported. Peak memory above the inputs, in one more call after the timed ones (gradients dropped
first, so they count as made): on CUDA torch.cuda.max_memory_allocated minus the memory allocated before it;
on CPU, where torch's allocator keeps no counter, the running sum of the torch profiler's memory events
(every tensor allocation and free) at its highest. Also on CPU, the process's RSS high-water over all calls
(VmHWM, the figure getrusage's ru_maxrss reports, reset through /proc/self/clear_refs once the inputs are
made) minus the RSS then: it adds allocator slack and the library code the first call pages in.

Usage: python benchmarks/linear_cross_entropy.py --out DIR [--device cpu|cuda] [--vocab 32000] [--tokens 2048]
       [--hidden 4096] [--dtype fp32|bf16] [--repeats 5] [--ignored 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from zerotune.speed.chunked_loss import IGNORE_INDEX, chunk_tokens_for, linear_cross_entropy_sum

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = ("head-frozen", "head-trained")
HAS_TORCH_LINEAR_CROSS_ENTROPY = hasattr(F, "linear_cross_entropy")


def stock(hidden, weight, labels):
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float() as the loop does; fp64 stays
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def zerotune(hidden, weight, labels):
    # the loop counts the label tokens on the host and passes the count (no host-device sync)
    return linear_cross_entropy_sum(hidden, weight, labels, label_count=int((labels != IGNORE_INDEX).sum()))


def torch_variant(**options):
    """F.linear_cross_entropy with these LinearCrossEntropyOptions fields (a callable one gets the head weight,
    for sizes that follow the vocabulary); reference=True: options=None, torch's unchunked reference path."""

    def run(hidden, weight, labels):
        chosen = None if options.get("reference") else torch.nn.LinearCrossEntropyOptions(
            **{k: (v(weight) if callable(v) else v) for k, v in options.items()})
        return F.linear_cross_entropy(hidden, weight, labels, reduction="sum", ignore_index=IGNORE_INDEX,
                                      options=chosen)

    return run


VARIANTS = {"stock": stock, "zerotune": zerotune}
if HAS_TORCH_LINEAR_CROSS_ENTROPY:
    VARIANTS |= {
        "torch-reference": torch_variant(reference=True),
        "torch-chunked-auto": torch_variant(),
        "torch-chunked-same-rows": torch_variant(batch_chunk_size=lambda weight: chunk_tokens_for(weight.size(0))),
    }


def make_inputs(args, dtype: torch.dtype, device: str, head_trains: bool):
    """The same hidden states, head weight and labels for every variant and dtype: drawn in fp64 on the CPU
    from one seed, then cast. Hidden states and weight are scaled so logits have a std of about 2."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(args.vocab, args.hidden, generator=generator, dtype=torch.float64) * (2 / args.hidden**0.5)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator)
    labels[torch.rand(args.tokens, generator=generator) < args.ignored] = IGNORE_INDEX
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(True)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(head_trains)
    return hidden, weight, labels.to(device)


def loss_and_grads(variant, hidden, weight, labels) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden.grad = weight.grad = None
    loss = VARIANTS[variant](hidden, weight, labels)
    loss.backward()
    grads = [hidden.grad] + ([weight.grad] if weight.requires_grad else [])
    return loss.detach(), grads


def difference(value: torch.Tensor, reference: torch.Tensor) -> dict:
    value, reference = value.double(), reference.double()
    diff = value - reference
    return {"relative_norm": float(diff.norm() / reference.norm()), "max_abs": float(diff.abs().max())}


def compare(reference, value) -> dict:
    """value and reference: (loss, [grad_hidden, grad_weight?]) as loss_and_grads returns them."""
    (loss, grads), (ref_loss, ref_grads) = value, reference
    names = ["grad_hidden", "grad_weight"]
    result = {"loss": float(loss), "loss_relative": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        result[name] = difference(grad, ref_grad)
    return result


def equality(args, device: str) -> dict:
    """Each variant against the stock path, on the benchmark's inputs, the head trained (both gradients)."""
    dtype = DTYPES[args.dtype]
    results = {"fp64": {}, args.dtype: {}}
    truth = loss_and_grads("stock", *make_inputs(args, torch.float64, device, True))
    in_dtype = loss_and_grads("stock", *make_inputs(args, dtype, device, True))
    for variant in VARIANTS:
        wide = truth if variant == "stock" else loss_and_grads(variant, *make_inputs(args, torch.float64, device, True))
        compared = compare(truth, wide)
        compared["within_1e-10"] = compared["loss_relative"] <= 1e-10 and all(
            compared[name]["relative_norm"] <= 1e-10 for name in ("grad_hidden", "grad_weight"))
        results["fp64"][variant] = compared
        narrow = in_dtype if variant == "stock" else loss_and_grads(variant, *make_inputs(args, dtype, device, True))
        results[args.dtype][variant] = {"against_stock_in_" + args.dtype: compare(in_dtype, narrow),
                                        "against_stock_in_fp64": compare(truth, narrow)}
        print(variant, json.dumps(results["fp64"][variant]["loss_relative"]),
              json.dumps(results[args.dtype][variant]["against_stock_in_fp64"]), flush=True)
    return results


def process_memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the high-water since start or the last reset) of this process, Linux."""
    kib = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith(field + ":"))
    return int(kib) * 1024


def reset_rss_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)


def profiled_peak_bytes(profiler) -> int:
    """The highest running sum of the profiler's memory events (allocations positive, frees negative)."""
    events = sorted((event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
                    key=lambda event: event.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(args) -> dict:
    """One (variant, case), in this fresh process: time per forward+backward and peak memory above inputs."""
    device = args.device
    hidden, weight, labels = make_inputs(args, DTYPES[args.dtype], device, args.case == "head-trained")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cpu":
        reset_rss_high_water()
        rss_before = process_memory_bytes("VmRSS")
    seconds = []
    for call in range(1 + args.repeats):
        start = time.perf_counter()
        loss_and_grads(args.worker, hidden, weight, labels)
        sync()
        if call:  # the first call warms up
            seconds.append(time.perf_counter() - start)
    result = {"seconds_median": round(statistics.median(seconds), 4), "seconds_all": [round(s, 4) for s in seconds]}
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_and_grads(args.worker, hidden, weight, labels)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        result["rss_high_water_above_inputs_mib"] = round((process_memory_bytes("VmHWM") - rss_before) / 2**20, 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
            loss_and_grads(args.worker, hidden, weight, labels)
        peak = profiled_peak_bytes(profiler)
    result["peak_memory_above_inputs_mib"] = round(peak / 2**20, 1)
    return result


def measure_in_subprocess(args, variant: str, case: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--case", case, "--device", args.device,
               "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--ignored", str(args.ignored)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant} ({case}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "has_torch_linear_cross_entropy": HAS_TORCH_LINEAR_CROSS_ENTROPY, "cores": os.cpu_count(),
             "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    cpuinfo = Path("/proc/cpuinfo").read_text()
    found["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                         if line.startswith("model name")), platform.processor())
    found["cpu_avx512_bf16"] = "avx512_bf16" in cpuinfo
    found["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
        found["cuda"] = torch.version.cuda
    return found


def machine_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((chip for chip in ("h200", "h100", "a100") if chip in name), "gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the results JSON (date-machine-name.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of hidden states (batch x sequence)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up; the median counts")
    parser.add_argument("--ignored", type=float, default=0.25, help="fraction of labels set to -100 (prompt)")
    parser.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    if args.out is None:
        parser.error("--out DIR is required")
    report = {"date": date.today().isoformat(),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip(),
              "machine": machine(args.device),
              "command": shlex.join(["python", str(Path(sys.argv[0])), *sys.argv[1:]]),
              "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
                        "ignored_fraction": args.ignored, "zerotune_chunk_rows": chunk_tokens_for(args.vocab),
                        "full_fp32_logits_mib": round(args.tokens * args.vocab * 4 / 2**20, 1)},
              "peak_memory_method": ("torch.cuda.max_memory_allocated minus memory_allocated before the call"
                                     if args.device == "cuda" else
                                     "highest running sum of the torch profiler's memory events in one call; "
                                     "rss_high_water: VmHWM over all calls (reset via /proc/self/clear_refs after "
                                     "the inputs were made) minus the RSS then; a fresh subprocess per variant"),
              "variants": list(VARIANTS)}
    if HAS_TORCH_LINEAR_CROSS_ENTROPY:  # what "auto" picks here (a private method: the one the function calls)
        auto = torch.nn.LinearCrossEntropyOptions()._adjust(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype],
                                                            torch.device(args.device))
        report["shape"]["torch_auto_options"] = {"acc_policy": auto.acc_policy, "acc_dtype": str(auto.acc_dtype),
                                                 "batch_chunk_size": auto.batch_chunk_size}
    report["equality"] = equality(args, args.device)
    report["time_and_memory"] = {case: {} for case in CASES}
    for case in CASES:
        for variant in VARIANTS:
            report["time_and_memory"][case][variant] = measured = measure_in_subprocess(args, variant, case)
            print(case, variant, json.dumps(measured), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{report['date']}-{machine_name(args.device)}-linear-cross-entropy-{args.dtype}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
