"""``zerotune bench``'s driver: one workload, the baseline first, then zerotune's own loop, one JSON result."""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from zerotune.bench.baseline import run_baseline
from zerotune.bench.peers import PEER_NAMES, cannot_do, description, run_peer
from zerotune.bench.power import PowerSampler
from zerotune.bench.timing import step_spread
from zerotune.adapters import ADAPTER_DIR
from zerotune.bench.workloads import ARCHITECTURES, WORKLOADS, Workload, lora_mfu, pair_lengths, tiny_version, \
    token_records


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def commit() -> str:
    if os.environ.get("ZEROTUNE_COMMIT"):
        return os.environ["ZEROTUNE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str) -> dict:
    """What every results file names: the GPU, the date, the commit and the exact command."""
    return {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": commit(), "command": command}


# ---------------------------------------------------------------------------------------------- setup
def write_model_dir(directory: Path, arch: dict, dtype: torch.dtype, saved_weights: bool, seed: int) -> Path:
    """config.json and a small tokenizer (the data is pre-tokenized, so its vocabulary does not matter).
    QLoRA needs real files to quantize while loading: then random weights are saved too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zerotune.quickstart import resource, tokenizer_corpus
    from zerotune.tiny import build_tokenizer

    records = [json.loads(line) for line in resource("quickstart_train.jsonl").read_text().splitlines() if line]
    tokenizer = build_tokenizer(tokenizer_corpus(records), vocab_size=300)
    config = LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if saved_weights and any(directory.glob("*.safetensors")):
        pass  # written by an earlier bench in the same --work-dir (same architecture and seed)
    elif saved_weights:
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(directory, safe_serialization=True)
        del model
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    else:
        config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_config(workload: Workload, model_dir: Path, data_path: Path, output: Path, steps: int, tiny: bool,
               seed: int, extra: dict):
    from zerotune.config import build_config

    layers = {
        "model.name": str(model_dir), "model.init": "pretrained" if workload.method == "qlora" else "random",
        "model.dtype": "fp32" if tiny else "bf16", "model.attn_implementation": "sdpa",
        "model.gradient_checkpointing": workload.checkpointing, "model.compile": "off" if tiny else "on",
        "adapter.method": workload.method, "adapter.r": 16, "adapter.alpha": 32, "adapter.dropout": 0.0,
        "data.path": str(data_path), "data.template": "tokens", "data.max_seq_len": workload.seq_len,
        "data.eval_fraction": 0.0, "data.packing": workload.short_examples,
        "train.batch_size": 1 if workload.short_examples else workload.micro_batch, "train.grad_accum": 1,
        "train.max_steps": steps, "train.lr": 1e-4, "train.warmup_steps": 0, "train.schedule": "constant",
        "train.weight_decay": 0.0, "train.seed": seed, "train.log_every": 1, "train.eval_every": 0,
        "tracking.backend": "none", "output.dir": str(output), "distributed.num_workers": workload.gpus,
        "distributed.use_cpu": tiny, "distributed.strategy": "auto",
    }
    if workload.objective != "sft":  # pairs of token ids (data.pairs' tokens form); the reference: LoRA off
        layers |= {"objective.name": workload.objective, "objective.beta": DPO_BETA, "objective.reference": "live"}
    layers.update(extra)
    return build_config(layers)


DPO_BETA = 0.1

# Steady W1/W2 baselines on H200s spread up to 1.04 (the 90th-percentile step over the 10th); on some machines
# the HF side's steps wandered by 15-25% within a run, and its ratio then flattered ours (docs/benchmarks.md,
# "HF step spread").
STEADY_SPREAD = 1.05
# a side drawing this share of the board's power cap on average runs at the cap (the driver lowers the SM clock)
POWER_BOUND_SHARE = 0.97


# ------------------------------------------------------------------------------------------ ours
def run_ours(config, warmup: int, gpus: int) -> dict:
    from zerotune.launchers import launch
    from zerotune.run_dir import prepare_output_dir

    # bench's own run directory inside its work directory: an earlier bench's run there is replaced, nothing else
    with prepare_output_dir(Path(config.output.dir), overwrite=True):
        launch(config, show_progress=False)
    events = [json.loads(line) for line in (Path(config.output.dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e and "step_seconds" in e]
    timed = steps[warmup:]
    tokens = sum(e["tokens_per_second"] * e["step_seconds"] for e in timed)
    seconds = sum(e["step_seconds"] for e in timed)
    peaks = [e["peak_memory_gib"] for e in steps if "peak_memory_gib" in e]
    adapter = Path(config.output.dir) / ADAPTER_DIR / "adapter_model.safetensors"
    per_step = [(e["tokens_per_second"] * e["step_seconds"], e["step_seconds"]) for e in timed]
    return {"tokens_per_second": tokens / seconds, "tokens_per_second_per_gpu": tokens / seconds / gpus,
            **step_spread(per_step),
            "peak_gib": max(peaks) if peaks else None,
            "real_token_fraction": sum(e["real_token_fraction"] for e in timed) / len(timed),
            "losses": [e["loss"] for e in steps], "timed_steps": len(timed), "timed_tokens": round(tokens),
            "timed_label_tokens": round(sum(e["label_tokens"] for e in timed)),
            "trainable_parameters": stored_elements(adapter),
            # each step's event is logged when the host reads the step back (one step late, while the next
            # runs): from the first timed step's start to the last one's end, give or take a step's host work
            "timed_window": [timed[0]["time"] - timed[0]["step_seconds"], timed[-1]["time"]]}


def stored_elements(path: Path) -> int:
    """How many values a safetensors file holds: the trainable parameters zerotune saved."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


# ------------------------------------------------------------------------------------------ driver
BASELINES = ("hf",) + PEER_NAMES  # hf: the stock HF+PEFT loop (baseline.py); the rest: peers.py
BENCH_OWNED = ("output.dir", "output.overwrite", "checkpoint.resume")  # overrides bench refuses


def claim_work_dir(work: Path) -> None:
    """A new or empty --work-dir, or one an earlier bench used (it reuses the model there); never a directory of
    someone's files, which bench would write into."""
    from zerotune.run_dir import check_owned, probe_writable, write_marker

    check_owned(work, "bench", overwrite=True, flag="--work-dir")
    probe_writable(work, flag="--work-dir")
    work.mkdir(parents=True, exist_ok=True)
    write_marker(work, "bench")


def run_bench(name: str, tiny: bool = False, steps: int | None = None, warmup: int | None = None,
              out_dir: str = "benchmarks/results", work_dir: str | None = None, seed: int = 0,
              ours_overrides: dict | None = None, command: str = "", baselines: tuple[str, ...] | None = None,
              micro_batch: int | None = None) -> dict:
    """Run one workload: the baselines first (HF+PEFT in this process and its workers, each peer in a process of
    its own), then ours. ``baselines``: the workload's default (the first it allows) unless given; ``micro_batch``
    replaces the workload's on every side. Returns the result."""
    workload, steps, warmup, baselines = _checked_request(name, tiny, steps, warmup, baselines, ours_overrides or {},
                                                          micro_batch)
    arch = ARCHITECTURES[workload.architecture]
    work = Path(work_dir or tempfile.mkdtemp(prefix="zerotune-bench-"))
    claim_work_dir(work)
    model_dir = write_model_dir(work / "model", arch, torch.float32 if tiny else torch.bfloat16,
                                saved_weights=workload.method == "qlora", seed=seed)
    count = steps * workload.micro_batch * workload.gpus * (3 if workload.short_examples else 1)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in token_records(workload, arch["vocab_size"], count, seed)))

    spec = {"model_dir": str(model_dir), "data": str(data), "steps": steps, "warmup": warmup, "seed": seed,
            "micro_batch": workload.micro_batch, "checkpointing": workload.checkpointing, "tiny": tiny,
            "method": workload.method, "out": str(work / "baseline.json"), "seq_len": workload.seq_len,
            "short_examples": workload.short_examples, "work": str(work), "architecture": workload.architecture,
            "objective": workload.objective}
    if workload.objective != "sft":
        spec |= dict(zip(("prompt_length", "response_length"), pair_lengths(workload)), beta=DPO_BETA)
    gpu = gpu_name()
    print(f"[bench] {workload.description}\n[bench] {gpu}; {steps} steps, first {warmup} not timed", flush=True)
    with PowerSampler(period=0.02) as sampler:  # GPU 0's watts and clock (nothing on CPU or without NVML)
        sides = _run_baselines(baselines, workload, spec)
        print("[bench] zerotune ...", flush=True)
        config = run_config(workload, model_dir, data, work / "ours", steps, tiny, seed, ours_overrides or {})
        ours = run_ours(config, warmup, workload.gpus)

    pairs = workload.objective != "sft"
    if pairs:  # zerotune's steps each train micro_batch pairs per GPU (the peers count theirs from their batches)
        ours["timed_pairs"] = ours["timed_steps"] * workload.micro_batch * workload.gpus
    for side in [ours, *(s for s in sides.values() if "tokens_per_second" in s)]:
        mfu = None if workload.short_examples else lora_mfu(side["tokens_per_second_per_gpu"], arch,
                                                           workload.seq_len, gpu, reference=pairs)
        side["lora_mfu"] = mfu
        if pairs:
            side["pairs_per_second"] = side["timed_pairs"] / sum(side["step_seconds"])
        power = sampler.window(*side.pop("timed_window"), seconds_per_step=sum(side["step_seconds"])
                               / len(side["step_seconds"]))
        if power:
            side["power"] = power
    result = {
        "workload": name + ("-tiny" if tiny else ""), "description": workload.description, "gpus": workload.gpus,
        **provenance(command or f"zerotune bench {name}" + (" --tiny" if tiny else "")),
        "settings": {"architecture": workload.architecture, "seq_len": workload.seq_len, "steps": steps,
                     "warmup_steps": warmup, "micro_batch": workload.micro_batch, "method": workload.method,
                     "gradient_checkpointing": workload.checkpointing, "objective": workload.objective,
                     **({"prompt_tokens": spec["prompt_length"], "response_tokens": spec["response_length"],
                         "beta": DPO_BETA, "reference": "the base with the adapter off"} if pairs else {}),
                     "ours": {k: v for k, v in config.to_dict()["model"].items() if k != "name"}
                     | {"packing": config.data.packing, "strategy": config.distributed.strategy,
                        "cuda_graph": config.train.cuda_graph}
                     | ({"objective": config.to_dict()["objective"]} if pairs else {})},
        "metric": "pairs/s" if pairs else "effective (non-pad) tokens/s" if workload.short_examples else "tokens/s",
        "baselines": list(baselines), "ours": ours,
    }
    if "hf" in sides:
        result |= {"baseline": sides["hf"], **ratios(ours, sides["hf"])}
    peers = {peer: side | (ratios(ours, side) if "tokens_per_second" in side else {})
             for peer, side in sides.items() if peer != "hf"}
    if peers:
        result["peers"] = peers
    result["path"] = str(_write_result(result, Path(out_dir), gpu, workload.gpus))
    print(summary(result), flush=True)
    return result


def _checked_request(name: str, tiny: bool, steps: int | None, warmup: int | None, baselines: tuple[str, ...] | None,
                     ours_overrides: dict, micro_batch: int | None = None) -> tuple[Workload, int, int, tuple[str, ...]]:
    """The workload (its tiny version with ``tiny``, its micro-batch replaced), the step counts and the baselines
    without repeats (the workload's default if none), or a ConfigError before anything runs: an unknown workload
    or baseline, one the workload is not compared with, too few GPUs, no more steps than warm-up steps, an
    override of what bench decides."""
    from zerotune.errors import ConfigError

    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    workload = WORKLOADS[name]
    baselines = workload.baselines[:1] if baselines is None else baselines
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or not baselines:
        raise ConfigError(f"--baseline {','.join(unknown)}: choose from {', '.join(BASELINES)}")
    refused = [b for b in baselines if b not in workload.baselines]
    if refused:
        raise ConfigError(f"--baseline {','.join(refused)}: workload {name} is compared with "
                          f"{', '.join(workload.baselines)} only; pass --baseline {','.join(workload.baselines)}")
    baselines = tuple(dict.fromkeys(baselines))
    if micro_batch is not None:
        workload = replace(workload, micro_batch=micro_batch)
    if tiny:
        workload = tiny_version(workload)
    elif not torch.cuda.is_available():
        raise ConfigError(f"workload {name} needs a CUDA GPU; on CPU pass --tiny to test the harness")
    elif torch.cuda.device_count() < workload.gpus:
        raise ConfigError(f"workload {name} needs {workload.gpus} GPUs, this machine has {torch.cuda.device_count()}")
    steps = steps or (4 if tiny else 30)
    warmup = warmup if warmup is not None else (1 if tiny else 5)
    if steps <= warmup:
        raise ConfigError(f"--steps {steps} must be more than --warmup-steps {warmup}")
    claimed = {key: value for key, value in ours_overrides.items() if key in BENCH_OWNED}
    if claimed:
        raise ConfigError(f"{', '.join(claimed)}: bench decides these itself (its run goes under its work "
                          f"directory); drop the override, and pass --work-dir to choose where it goes")
    return workload, steps, warmup, baselines


def _run_baselines(baselines: tuple[str, ...], workload: Workload, spec: dict) -> dict[str, dict]:
    """Each baseline's measurements, in order: HF+PEFT in this process (and its workers), each peer in a process
    of its own, or {"not_measured": why} for a peer that cannot run this workload. Memory is freed after each."""
    sides = {}
    for baseline in baselines:
        print(f"[bench] baseline: {baseline_label(baseline, workload.objective)} ...", flush=True)
        if baseline == "hf":
            sides["hf"] = run_baseline(workload, spec)
        else:
            sides[baseline] = ({"not_measured": cannot_do(baseline, workload.gpus)}
                               if cannot_do(baseline, workload.gpus) else run_peer(baseline, spec))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return sides


def _write_result(result: dict, target: Path, gpu: str, gpus: int) -> Path:
    """``result`` as target/<date>-<gpu>-<workload>.json (the GPU's short name, with xN for N > 1 GPUs)."""
    target.mkdir(parents=True, exist_ok=True)
    slug = gpu.replace("NVIDIA", "").strip().split()[0].lower() if gpu != "cpu" else "cpu"
    slug += f"x{gpus}" if gpus > 1 else ""
    path = target / f"{result['date']}-{slug}-{result['workload']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def ratios(ours: dict, baseline: dict) -> dict:
    """Ours against one baseline: mean tokens/s, tokens/s at the median step, peak memory."""
    pairs = {"pairs_per_second_ratio": ours["pairs_per_second"] / baseline["pairs_per_second"]} \
        if "pairs_per_second" in ours and "pairs_per_second" in baseline else {}
    return {**pairs, "ratio": ours["tokens_per_second"] / baseline["tokens_per_second"],
            "median_step_ratio": ours["median_step_tokens_per_second"] / baseline["median_step_tokens_per_second"],
            "peak_memory_ratio": (ours["peak_gib"] / baseline["peak_gib"]) if ours["peak_gib"] and baseline["peak_gib"]
            else None}


def baseline_label(name: str, objective: str = "sft") -> str:
    return "HF+PEFT eager" if name == "hf" else description(name, objective)


def summary(result: dict) -> str:
    measured = {"zerotune": result["ours"]}
    if "baseline" in result:
        measured["HF+PEFT"] = result["baseline"]
    measured |= {name: side for name, side in result.get("peers", {}).items() if "tokens_per_second" in side}
    powered = any("power" in side for side in measured.values())
    pairs = result["metric"] == "pairs/s"

    def row(label, side):
        mfu = f"{side['lora_mfu']:.1%}" if side.get("lora_mfu") else "-"
        peak = f"{side['peak_gib']:.1f}" if side.get("peak_gib") else "-"
        line = f"  {label:<10} " + (f"{side['pairs_per_second']:>8.2f} " if pairs else "")
        line += f"{side['tokens_per_second']:>12,.0f} {mfu:>9} {peak:>9}"
        if pairs:
            line += f" {side['losses'][0]:>10.6f}"
        if powered:
            power = side.get("power") or {}
            watts, mhz, joules = (f"{power[k]:,.0f}" if power.get(k) else "-"
                                  for k in ("mean_watts", "sm_mhz_median", "joules_per_step"))
            line += f" {watts:>7} {mhz:>7} {joules:>8}"
        return line

    def ratio_line(label, side):
        memory = f", peak memory x{side['peak_memory_ratio']:.2f}" if side.get("peak_memory_ratio") else ""
        what = f"pairs/s {side['pairs_per_second_ratio']:.2f}x, tokens/s " if "pairs_per_second_ratio" in side else ""
        return (f"  ratio against {label}: {what}{side['ratio']:.2f}x (at the median step "
                f"{side['median_step_ratio']:.2f}x){memory}")

    header = f"  {'':<10} " + (f"{'pairs/s':>8} " if pairs else "") + f"{'tokens/s':>12} {'LoRA-MFU':>9} {'peak GiB':>9}"
    header += f" {'first loss':>10}" if pairs else ""
    lines = [f"[bench] {result['workload']} on {result['gpu']} ({result['metric']})",
             header + (f" {'watts':>7} {'SM MHz':>7} {'J/step':>8}" if powered else "")]
    lines += [row(label, side) for label, side in measured.items() if label != "zerotune"]
    lines.append(row("zerotune", result["ours"]))
    if "baseline" in result:
        lines.append(ratio_line("HF+PEFT", result))
    for name, side in result.get("peers", {}).items():
        lines.append(ratio_line(name, side) if "ratio" in side else
                     f"  {name}: {side.get('not_available') or side.get('not_measured') or side.get('error')}")
    lines.append(f"  -> {result.get('path', '')}")
    if "baseline" not in result:
        return "\n".join(lines)
    wandered = result["baseline"].get("step_spread", 1.0)
    if wandered > STEADY_SPREAD and result["metric"] == "tokens/s":  # W3's steps differ by design (their lengths)
        lines.append(f"  note: HF+PEFT's steps wandered (90th-percentile step {wandered:.2f}x the 10th; steady runs: "
                     f"up to {STEADY_SPREAD - 0.01:.2f}x): a noisy machine slows the baseline and flatters the ratio; "
                     "run it again, or on another machine")
    power = result["ours"].get("power") or {}
    if power.get("power_limit_watts") and power["mean_watts"] >= POWER_BOUND_SHARE * power["power_limit_watts"]:
        lines.append(f"  note: zerotune's steps drew {power['mean_watts']:,.0f} W of GPU 0's "
                     f"{power['power_limit_watts']:,.0f} W cap (SM clock {power['sm_mhz_median']:,.0f} MHz): the "
                     "step is power-bound here, so it lasts its energy over the cap; faster kernels gain little, "
                     "fewer joules per step do")
    return "\n".join(lines)
