"""What checksumming adds to a checkpoint save, on CPU, with zerotune's own save path.

Each case builds trainable tensors of a real run's shapes, an AdamW whose state is filled by one step, and
saves them with ``zerotune.checkpoints.save_checkpoint`` through the single-device engine (safetensors
weights, a torch.save optimizer file, RNG and trainer state). "with hashing" is the save as it is: every file
is fsynced and, at the same time, read back from the page cache and hashed (SHA-256). "without hashing"
leaves the hashing out, which is what a save did before checksums: each file fsynced, its size recorded. Saves alternate between the two so
that disk and page-cache drift hit both alike; the median of ``--repeats`` is reported. The verification a
resume does (every file read and hashed again) is timed too, warm (from the page cache, as right after a
save) only: a cold read is disk-bound and depends on the disk.

Cases:
  lora-7b   r16 LoRA on every linear layer of Llama-2-7B: 32 layers x (q, k, v, o 4096->4096; gate, up
            4096->11008; down 11008->4096), A [16, in] and B [out, 16] in fp32: 40.0M parameters,
            160 MB of weights, 320 MB of AdamW state.
  full-NGB  fp32 tensors of 4096 x 11008 (a 7B MLP matrix) up to N GB of weights (--full-gb), and AdamW's
            two moments (2N GB): a full fine-tune's checkpoint per GB, to extrapolate from.

Usage: python benchmarks/checkpoint_hashing.py [--dir DIR] [--full-gb 1.0] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from zerotune import checkpoints
from zerotune.checkpoints import manifest
from zerotune.config import build_config
from zerotune.strategies.single import SingleDeviceStrategy

LLAMA2_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008}


def lora_7b_tensors(rank: int = 16) -> dict[str, torch.Tensor]:
    hidden, intermediate = LLAMA2_7B["hidden"], LLAMA2_7B["intermediate"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
              "down_proj": (intermediate, hidden)}
    tensors = {}
    for layer in range(LLAMA2_7B["layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank)
    return tensors


def full_tensors(gigabytes: float) -> dict[str, torch.Tensor]:
    rows, cols = LLAMA2_7B["intermediate"], LLAMA2_7B["hidden"]
    count = max(1, round(gigabytes * 1e9 / (rows * cols * 4)))
    return {f"model.layers.{i}.mlp.weight": torch.randn(rows, cols) for i in range(count)}


class Trainable(torch.nn.Module):
    """The tensors as trainable parameters (named weights.0, weights.1, ...)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(t) for t in tensors.values())


def engine_for(model: Trainable) -> SingleDeviceStrategy:
    """The single-device engine with AdamW state filled (exp_avg, exp_avg_sq per weight), as after a step."""
    strategy = SingleDeviceStrategy(build_config({}), torch.device("cpu"))
    strategy.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    strategy.scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lambda step: 1.0)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    strategy.optimizer.step()
    strategy.optimizer.zero_grad(set_to_none=True)
    return strategy


def no_digest(path: Path) -> None:
    """Hashing left out: the save then only fsyncs each file and records its size, as before checksums."""
    return None


def timed_save(strategy, model, directory: Path, step: int, hashing: bool) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()  # each save starts with nothing of the last one still to write back
    manifest.file_digest = REAL_DIGEST if hashing else no_digest
    try:
        start = time.perf_counter()
        checkpoints.save_checkpoint(strategy, model, directory, step, {"step": step}, keep=1)
        return time.perf_counter() - start
    finally:
        manifest.file_digest = REAL_DIGEST


REAL_DIGEST = manifest.file_digest


def run_case(name: str, tensors: dict[str, torch.Tensor], base: Path, repeats: int) -> dict:
    model = Trainable(tensors)
    strategy = engine_for(model)
    directory = base / name
    times = {"with_hashing": [], "without_hashing": []}
    timed_save(strategy, model, directory, 1, hashing=True)  # warm-up: first-touch allocations, imports
    for repeat in range(repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        for hashing in order:
            times["with_hashing" if hashing else "without_hashing"].append(
                timed_save(strategy, model, directory, 2 + repeat, hashing))
    timed_save(strategy, model, directory, 99, hashing=True)  # a checksummed checkpoint to verify
    saved = checkpoints.newest_checkpoint(directory)
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    checkpoint_bytes = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    verify = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert manifest.problem_with(saved) is None
        verify.append(time.perf_counter() - start)
    shutil.rmtree(directory, ignore_errors=True)
    with_hash, without = statistics.median(times["with_hashing"]), statistics.median(times["without_hashing"])
    gigabytes = checkpoint_bytes / 1e9
    return {
        "checkpoint_bytes": checkpoint_bytes,
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        "files": files,
        "save_seconds_with_hashing": round(with_hash, 3),
        "save_seconds_without_hashing": round(without, 3),
        "hashing_adds_seconds": round(with_hash - without, 3),
        "hashing_adds_fraction": round(with_hash / without - 1, 3),
        "hashing_adds_seconds_per_gb": round((with_hash - without) / gigabytes, 3),
        "save_seconds_per_gb_with_hashing": round(with_hash / gigabytes, 3),
        "save_seconds_per_gb_without_hashing": round(without / gigabytes, 3),
        "verify_seconds_warm": round(statistics.median(verify), 3),
        "verify_gb_per_second_warm": round(gigabytes / statistics.median(verify), 3),
        "all_save_seconds": {key: [round(t, 3) for t in value] for key, value in times.items()},
    }


def machine(directory: Path) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    filesystem = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True).stdout.split("\n")[1]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "sha_extensions": " sha_ni " in flags,
            "memory_gib": round(memory / 2**30, 1), "torch_threads": torch.get_num_threads(),
            "filesystem": " ".join(filesystem.split()[:2]), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/zerotune-checkpoint-hashing"))
    parser.add_argument("--full-gb", type=float, default=1.0, help="fp32 weights of the full case; AdamW adds 2x")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = {}
    results["lora-7b"] = run_case("lora-7b", lora_7b_tensors(), args.dir, args.repeats)
    print(json.dumps({"lora-7b": results["lora-7b"]}, indent=1), flush=True)
    name = f"full-{args.full_gb:g}gb-weights"
    results[name] = run_case(name, full_tensors(args.full_gb), args.dir, args.repeats)
    print(json.dumps({name: results[name]}, indent=1), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"date": date.today().isoformat(), "commit": commit, "machine": machine(args.dir),
              "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "checksum": manifest.CHECKSUM, "cases": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
