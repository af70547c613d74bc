"""``zerotune bench``: one named workload, run twice in the same process tree: the stock HF+PEFT baseline
(transformers model + ``peft.get_peft_model``, eager, SDPA, the model's own loss, fused AdamW) and zerotune's
own training loop (``zerotune.train.run`` through the normal launcher) on the same architecture, random
weights from the same seed, the same token data and the same settings. Writes one JSON result.

Workloads: W1 Llama-2-7B arch at seq 2048 (mb1 no checkpointing; mb4 checkpointing),
W2 Llama-3-8B arch (128k vocabulary), W3 short Alpaca-like examples (packed vs pad-to-longest, effective
tokens/s), W4 two GPUs, and QLoRA at mb1 and mb4. ``--tiny`` swaps in a tiny model, short rows and the CPU so
the harness itself is tested in CI (the speed is meaningless there).
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from zerotune.power import PowerSampler

ARCHITECTURES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, per GPU


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    architecture: str = "llama-2-7b"
    seq_len: int = 2048
    micro_batch: int = 1
    checkpointing: bool = False
    short_examples: bool = False  # W3: lognormal lengths; baseline pads to the longest, zerotune packs
    gpus: int = 1
    method: str = "lora"


WORKLOADS = {w.name: w for w in [
    Workload("w1", "W1: Llama-2-7B arch, LoRA r16 all-linear, seq 2048, micro-batch 1, no checkpointing"),
    Workload("w1-ckpt", "W1: Llama-2-7B arch, LoRA r16 all-linear, seq 2048, micro-batch 4, gradient checkpointing",
             micro_batch=4, checkpointing=True),
    Workload("w2", "W2: Llama-3-8B arch (128k vocabulary), LoRA r16 all-linear, seq 2048, micro-batch 1",
             architecture="llama-3-8b"),
    Workload("w3", "W3: Alpaca-like lengths (lognormal, median 150, 16-1024), effective tokens/s: HF pads "
                   "micro-batches of 4 to the longest, zerotune packs rows of 2048", short_examples=True,
             micro_batch=4),
    Workload("w4", "W4: two GPUs, Llama-2-7B arch, LoRA r16, seq 2048, micro-batch 4, checkpointing; "
                   "HF+PEFT under torch DDP vs zerotune", micro_batch=4, checkpointing=True, gpus=2),
    Workload("qlora", "QLoRA: Llama-2-7B arch, NF4 + double quant, bf16 compute, seq 2048, micro-batch 1, "
                      "checkpointing; HF path with prepare_model_for_kbit_training", checkpointing=True,
             method="qlora"),
    Workload("qlora-mb4", "QLoRA as above, micro-batch 4", micro_batch=4, checkpointing=True, method="qlora"),
]}


def tiny_version(workload: Workload) -> Workload:
    return replace(workload, architecture="tiny", seq_len=128, method="lora")


def lengths(count: int, seq_len: int, seed: int) -> list[int]:
    """W3's lengths: lognormal, median 150 and mean ~190 tokens, clipped to 16..1024 (scaled to seq_len/2048)."""
    rng = random.Random(seed)
    scale = seq_len / 2048
    sigma = math.sqrt(2 * math.log(190 / 150))  # lognormal mean / median = exp(sigma^2 / 2)
    return [max(max(2, round(16 * scale)), min(round(1024 * scale),
                                                round(scale * rng.lognormvariate(math.log(150), sigma))))
            for _ in range(count)]


def token_records(workload: Workload, vocab_size: int, count: int, seed: int) -> list[dict]:
    """Random-token records: full rows (labels = inputs), or W3's short examples with a third as prompt."""
    rng = random.Random(seed)
    if not workload.short_examples:
        return [{"input_ids": [rng.randrange(4, vocab_size) for _ in range(workload.seq_len)]} for _ in range(count)]
    records = []
    for n in lengths(count, workload.seq_len, seed):
        ids = [rng.randrange(4, vocab_size) for _ in range(n)]
        records.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return records


def matmul_weights(arch: dict) -> int:
    """N of ANCHORS.md: every matmul weight, the output head included."""
    d, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    kv = d // arch["num_attention_heads"] * arch["num_key_value_heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * inter) + arch["vocab_size"] * d


def lora_mfu(tokens_per_second: float, arch: dict, seq_len: int, gpu: str) -> float | None:
    """tokens/s x (4N + 6 L d s) / peak: model FLOPs of LoRA (no weight gradients of frozen weights)."""
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in gpu), None)
    if peak is None:
        return None
    flops = 4 * matmul_weights(arch) + 6 * arch["num_hidden_layers"] * arch["hidden_size"] * seq_len
    return tokens_per_second * flops / peak


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
    layers.update(extra)
    return build_config(layers)


# ------------------------------------------------------------------------------------------ baseline
def baseline_worker(rank: int, world_size: int, spec: dict) -> None:
    """The stock path, one process per GPU (torch DDP when there are several): what TRL/Axolotl users run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from zerotune.data.batches import BatchPlan, collate
    from zerotune.data.encode import EncodedExample

    cuda = torch.cuda.is_available() and not spec["tiny"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world_size > 1:
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{spec['port']}",
                                rank=rank, world_size=world_size)
    dtype = torch.float32 if spec["tiny"] else torch.bfloat16
    torch.manual_seed(spec["seed"])
    if spec["method"] == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=quant, dtype=dtype,
                                                     device_map={"": device}, attn_implementation="sdpa")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        config = AutoConfig.from_pretrained(spec["model_dir"])
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        if spec["checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
    trained = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                                  fused=cuda)
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    examples = [EncodedExample(r["input_ids"], r.get("labels") or r["input_ids"]) for r in records]
    plan = BatchPlan(len(examples), spec["micro_batch"], 1, world_size, spec["seed"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for step in range(spec["steps"]):
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        (indices,) = plan.micro_batches(epoch, in_epoch, rank)
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], 0).items()}
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                       use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        steps.append({"seconds": time.perf_counter() - started, "end": time.time(),
                      "tokens": int(batch["attention_mask"].sum()),
                      "slots": batch["input_ids"].numel(), "loss": loss.item()})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps({"steps": steps, "peak_gib": peak}))
    if world_size > 1:
        import torch.distributed as dist

        # DDP's reducer holds the process group. Freed after destroy_process_group, it would drop the group's
        # last reference while holding the GIL, and gloo's worker thread, finishing a work item, waits for the
        # GIL: a deadlock at exit (seen in CI). Free it first, while the group is still registered.
        del trained, model, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_baseline(workload: Workload, spec: dict) -> dict:
    if workload.gpus > 1:
        import torch.multiprocessing as mp

        spec["port"] = free_port()
        mp.spawn(baseline_worker, args=(workload.gpus, spec), nprocs=workload.gpus, join=True)
    else:
        baseline_worker(0, 1, spec)
    ranks = [json.loads(Path(spec["out"]).with_suffix(f".rank{r}.json").read_text()) for r in range(workload.gpus)]
    steps = ranks[0]["steps"]
    peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
    # every rank's tokens count; time is the slowest rank's, its total and its steps (they sync each step, so a
    # rank that finishes a step early waits in the next: the per-step maximum over ranks would count that twice)
    timed = slice(spec["warmup"], None)
    tokens = sum(sum(s["tokens"] for s in r["steps"][timed]) for r in ranks)
    slowest = max(ranks, key=lambda r: sum(s["seconds"] for s in r["steps"][timed]))
    seconds = sum(s["seconds"] for s in slowest["steps"][timed])
    slots = sum(sum(s["slots"] for s in r["steps"][timed]) for r in ranks)
    per_step = [(sum(r["steps"][i]["tokens"] for r in ranks), slowest["steps"][i]["seconds"])
                for i in range(len(steps))][timed]
    first = steps[timed][0]
    return {"tokens_per_second": tokens / seconds, "tokens_per_second_per_gpu": tokens / seconds / workload.gpus,
            **step_spread(per_step),
            "peak_gib": max(peaks) if peaks else None, "real_token_fraction": tokens / slots,
            "losses": [sum(r["steps"][i]["loss"] for r in ranks) / len(ranks) for i in range(len(steps))],
            "timed_steps": len(steps[timed]),
            "timed_window": [first["end"] - first["seconds"], steps[-1]["end"]]}


def step_spread(per_step: list[tuple[float, float]]) -> dict:
    """Each timed step's seconds, tokens/s at the median step, and the spread of the step times: a shared
    machine sometimes slows a stretch of steps (seen on H200 hosts: 120 ms steps turning 170 ms for a dozen
    steps); the median shows the code's own speed, the mean (tokens_per_second, the headline) what the run got."""
    import statistics

    seconds = [s for _, s in per_step]
    return {"step_seconds": [round(s, 5) for s in seconds],
            "median_step_tokens_per_second": statistics.median(tokens / s for tokens, s in per_step),
            "step_spread": spread(seconds)}


def spread(seconds: list[float]) -> float:
    """The 90th-percentile step time over the 10th: how much a run's steps wandered, robust to one slow step."""
    import statistics

    if len(seconds) < 2:
        return 1.0
    deciles = statistics.quantiles(seconds, n=10, method="inclusive")
    return deciles[-1] / deciles[0]


# Steady W1/W2 baselines on H200s spread up to 1.04 (the 90th-percentile step over the 10th); on some machines
# the HF side's steps wandered by 15-25% within a run, and its ratio then flattered ours (README: "HF step
# spread").
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
    per_step = [(e["tokens_per_second"] * e["step_seconds"], e["step_seconds"]) for e in timed]
    return {"tokens_per_second": tokens / seconds, "tokens_per_second_per_gpu": tokens / seconds / gpus,
            **step_spread(per_step),
            "peak_gib": max(peaks) if peaks else None,
            "real_token_fraction": sum(e["real_token_fraction"] for e in timed) / len(timed),
            "losses": [e["loss"] for e in steps], "timed_steps": len(timed),
            # each step's event is logged when the host reads the step back (one step late, while the next
            # runs): from the first timed step's start to the last one's end, give or take a step's host work
            "timed_window": [timed[0]["time"] - timed[0]["step_seconds"], timed[-1]["time"]]}


# ------------------------------------------------------------------------------------------ driver
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
              ours_overrides: dict | None = None, command: str = "") -> dict:
    """Run one workload: baseline first, then ours, in this process (and its workers). Returns the result."""
    from zerotune.errors import ConfigError

    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    workload = WORKLOADS[name]
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
    arch = ARCHITECTURES[workload.architecture]
    claimed = {key: value for key, value in (ours_overrides or {}).items() if key in BENCH_OWNED}
    if claimed:
        raise ConfigError(f"{', '.join(claimed)}: bench decides these itself (its run goes under its work "
                          f"directory); drop the override, and pass --work-dir to choose where it goes")
    work = Path(work_dir or tempfile.mkdtemp(prefix="zerotune-bench-"))
    claim_work_dir(work)
    model_dir = write_model_dir(work / "model", arch, torch.float32 if tiny else torch.bfloat16,
                                saved_weights=workload.method == "qlora", seed=seed)
    count = steps * workload.micro_batch * workload.gpus * (3 if workload.short_examples else 1)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in token_records(workload, arch["vocab_size"], count, seed)))

    spec = {"model_dir": str(model_dir), "data": str(data), "steps": steps, "warmup": warmup, "seed": seed,
            "micro_batch": workload.micro_batch, "checkpointing": workload.checkpointing, "tiny": tiny,
            "method": workload.method, "out": str(work / "baseline.json")}
    gpu = gpu_name()
    print(f"[bench] {workload.description}\n[bench] {gpu}; {steps} steps, first {warmup} not timed", flush=True)
    with PowerSampler(period=0.02) as sampler:  # GPU 0's watts and clock (nothing on CPU or without NVML)
        print("[bench] baseline: HF+PEFT eager ...", flush=True)
        baseline = run_baseline(workload, spec)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print("[bench] zerotune ...", flush=True)
        config = run_config(workload, model_dir, data, work / "ours", steps, tiny, seed, ours_overrides or {})
        ours = run_ours(config, warmup, workload.gpus)

    for side in (baseline, ours):
        mfu = None if workload.short_examples else lora_mfu(side["tokens_per_second_per_gpu"], arch,
                                                           workload.seq_len, gpu)
        side["lora_mfu"] = mfu
        power = sampler.window(*side.pop("timed_window"), seconds_per_step=sum(side["step_seconds"])
                               / len(side["step_seconds"]))
        if power:
            side["power"] = power
    result = {
        "workload": name + ("-tiny" if tiny else ""), "description": workload.description, "gpus": workload.gpus,
        **provenance(command or f"zerotune bench {name}" + (" --tiny" if tiny else "")),
        "settings": {"architecture": workload.architecture, "seq_len": workload.seq_len, "steps": steps,
                     "warmup_steps": warmup, "micro_batch": workload.micro_batch, "method": workload.method,
                     "gradient_checkpointing": workload.checkpointing,
                     "ours": {k: v for k, v in config.to_dict()["model"].items() if k != "name"}
                     | {"packing": config.data.packing, "strategy": config.distributed.strategy,
                        "cuda_graph": config.train.cuda_graph}},
        "metric": "effective (non-pad) tokens/s" if workload.short_examples else "tokens/s",
        "ours": ours, "baseline": baseline,
        "ratio": ours["tokens_per_second"] / baseline["tokens_per_second"],
        "median_step_ratio": ours["median_step_tokens_per_second"] / baseline["median_step_tokens_per_second"],
        "peak_memory_ratio": (ours["peak_gib"] / baseline["peak_gib"]) if ours["peak_gib"] and baseline["peak_gib"]
        else None,
    }
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    slug = gpu.replace("NVIDIA", "").strip().split()[0].lower() if gpu != "cpu" else "cpu"
    slug += f"x{workload.gpus}" if workload.gpus > 1 else ""
    path = target / f"{result['date']}-{slug}-{result['workload']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    result["path"] = str(path)
    print(summary(result), flush=True)
    return result


def summary(result: dict) -> str:
    powered = any("power" in result[side] for side in ("baseline", "ours"))

    def row(label, side):
        mfu = f"{side['lora_mfu']:.1%}" if side.get("lora_mfu") else "-"
        peak = f"{side['peak_gib']:.1f}" if side.get("peak_gib") else "-"
        line = f"  {label:<10} {side['tokens_per_second']:>12,.0f} {mfu:>9} {peak:>9}"
        if powered:
            power = side.get("power") or {}
            watts, mhz, joules = (f"{power[k]:,.0f}" if power.get(k) else "-"
                                  for k in ("mean_watts", "sm_mhz_median", "joules_per_step"))
            line += f" {watts:>7} {mhz:>7} {joules:>8}"
        return line

    memory = f", peak memory x{result['peak_memory_ratio']:.2f}" if result.get("peak_memory_ratio") else ""
    header = f"  {'':<10} {'tokens/s':>12} {'LoRA-MFU':>9} {'peak GiB':>9}"
    lines = [
        f"[bench] {result['workload']} on {result['gpu']} ({result['metric']})",
        header + (f" {'watts':>7} {'SM MHz':>7} {'J/step':>8}" if powered else ""),
        row("HF+PEFT", result["baseline"]), row("zerotune", result["ours"]),
        f"  ratio {result['ratio']:.2f}x (at the median step {result['median_step_ratio']:.2f}x){memory}"
        f"  -> {result.get('path', '')}",
    ]
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
