"""Falcon-180B QLoRA on one GPU: `zerotune train` itself, then a checkpoint and `--resume`, with the plan's
prediction for the same run in the same results file.

The Falcon-180B architecture (hidden 14848, 80 layers, 232 query heads in 8 KV groups, new decoder
layout, parallel attention, a head tied to the embeddings, vocabulary 65024), random NF4 weights built on
the GPU one matrix at a time (`--init random --method qlora`: no 360 GB of weight files), LoRA r16 on all
linear layers, seq 2048, gradient checkpointing. Pre-tokenized rows of 2048 tokens, so `--packing` changes
nothing but the collator; the micro-batch is the variable.

Two processes, as a user would run them: `train` for --steps steps with a checkpoint at the last one, then
`train --resume` for --resume-steps more. For each: exit status, per-step losses, tokens/s over the steps
after the first two, peak GPU memory (the loop's torch.cuda.max_memory_allocated), peak host RSS, and the
seconds from the command's start to the first step's start (imports, data, the NF4 build, adapters,
compilation set-up) and from the last step's end to the exit (the checkpoint and the final adapter save).

Usage: python benchmarks/gpu_falcon_180b.py --out DIR [--layers 80] [--batch-size 1] [--steps 4]
       [--resume-steps 2] [--packing] [--tiny] [-- extra train flags]
--tiny: a 2-layer Falcon of the same layout on CPU, to check this script (no numbers worth keeping).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

FALCON_180B = dict(hidden_size=14848, num_hidden_layers=80, num_attention_heads=232, num_kv_heads=8,
                   vocab_size=65024, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
                   tie_word_embeddings=True, max_position_embeddings=2048)
TINY = dict(FALCON_180B, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
            vocab_size=512)


def write_model_dir(directory: Path, arch: dict) -> Path:
    """config.json and a small tokenizer: the data is pre-tokenized, so its vocabulary does not matter."""
    from transformers import FalconConfig

    from zerotune.quickstart import resource, tokenizer_corpus
    from zerotune.tiny import build_tokenizer

    records = [json.loads(line) for line in resource("quickstart_train.jsonl").read_text().splitlines() if line]
    tokenizer = build_tokenizer(tokenizer_corpus(records), vocab_size=300)
    FalconConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_train(argv: list[str]) -> dict:
    """One `zerotune train` process; its exit status, wall times, losses and memory."""
    command = [sys.executable, "-c",
               "import resource, sys; from zerotune.cli import main; status = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)", *argv]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    ended = time.time()
    output = Path(argv[argv.index("--output-dir") + 1])
    events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()] \
        if (output / "metrics.jsonl").is_file() else []
    steps = [e for e in events if "loss" in e and "eval_loss" not in e and e.get("time", 0) >= started]
    timed = steps[2:] or steps
    peak_rss = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    return {
        "command": "zerotune " + " ".join(argv),
        "exit_status": done.returncode, "wall_seconds": ended - started,
        "seconds_to_first_step": steps[0]["time"] - steps[0]["step_seconds"] - started if steps else None,
        "seconds_after_last_step": ended - steps[-1]["time"] if steps else None,
        "steps": [e["step"] for e in steps], "losses": [e["loss"] for e in steps],
        "grad_norms": [e.get("grad_norm") for e in steps],
        "tokens_per_second": sum(e["tokens_per_second"] for e in timed) / len(timed) if timed else None,
        "peak_gpu_gib": max((e.get("peak_memory_gib", 0) for e in steps), default=None),
        "peak_host_rss_gib": int(peak_rss[0].split()[1]) / 2**20 if peak_rss else None,
        "metrics": steps,
        "tail": (done.stderr or "")[-4000:] if done.returncode else "",
    }


def plan(batch_size: int, packing: bool, layers: int, gpu: str) -> dict:
    """The planner's prediction for the same run (the whole model only: the catalog has 80 layers)."""
    if layers != FALCON_180B["num_hidden_layers"]:
        return {"note": "no prediction: the planner's catalog holds the 80-layer model"}
    argv = ["plan", "--model", "tiiuae/falcon-180B", "--method", "qlora", "--gpu", gpu, "--gpus", "1",
            "--gradient-checkpointing", "--max-seq-len", "2048", "--batch-size", str(batch_size),
            "--dataset-tokens", "1e7", "--json", *(["--packing"] if packing else [])]
    done = subprocess.run([sys.executable, "-m", "zerotune", *argv], capture_output=True, text=True)
    if done.returncode:
        return {"command": "zerotune " + " ".join(argv), "error": done.stderr[-2000:]}
    estimate = json.loads(done.stdout)["estimate"]
    return {"command": "zerotune " + " ".join(argv), "gpu_needed_gib": estimate["gpu_needed_gib"],
            "peak_allocated_gib": estimate["peak_allocated_gib"],
            "tokens_per_second": estimate["tokens_per_second_per_gpu"], "memory_gib": estimate["memory_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/falcon-180b")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume-steps", type=int, default=2, help="0: no resume")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("extra", nargs="*", help="more `zerotune train` flags")
    args = parser.parse_args()
    import torch

    from zerotune.bench import provenance

    result = provenance("python benchmarks/gpu_falcon_180b.py " + " ".join(sys.argv[1:]))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    arch = dict(TINY if args.tiny else FALCON_180B)
    arch["num_hidden_layers"] = TINY["num_hidden_layers"] if args.tiny else args.layers
    model_dir = write_model_dir(work / "model", arch)
    seq = 64 if args.tiny else 2048
    total = args.steps + args.resume_steps
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [4 + (i * 7919 + j * 104729) % (arch["vocab_size"] - 8)
                                                      for j in range(seq)]}) + "\n"
                            for i in range(args.batch_size * (total + 1))))
    output = str(work / "run")
    common = ["--model", str(model_dir), "--init", "random", "--method", "qlora", "--lora-r", "16",
              "--lora-target-modules", "all-linear", "--lora-dropout", "0", "--gradient-checkpointing",
              "--data", str(data), "--template", "tokens", "--max-seq-len", str(seq),
              "--batch-size", str(args.batch_size), "--eval-fraction", "0", "--tracking", "none",
              "--output-dir", output, "--quiet", *(["--packing"] if args.packing else []), *args.extra]
    first = run_train(["train", *common, "--max-steps", str(args.steps), "--save-steps", str(args.steps)])
    checkpoints = Path(output) / "checkpoints"
    first["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file()) \
        if checkpoints.is_dir() else None
    result["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30 \
        if torch.cuda.is_available() else None
    result.update({
        "workload": f"QLoRA, Falcon-180B architecture ({arch['num_hidden_layers']} layers, hidden "
                    f"{arch['hidden_size']}, {arch['num_attention_heads']} query heads in {arch['num_kv_heads']} "
                    "KV groups, new decoder layout, parallel attention, tied head), random NF4 weights built "
                    f"on the GPU, LoRA r16 all-linear, seq {seq}, micro-batch {args.batch_size}"
                    f"{', packing' if args.packing else ''}, gradient checkpointing, one GPU",
        "train": first,
        "plan": plan(args.batch_size, args.packing, arch["num_hidden_layers"],
                     "h200" if "H200" in str(result.get("gpu")) else "h100"),
    })
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"falcon_180b_{arch['num_hidden_layers']}l_mb{args.batch_size}{'_packed' if args.packing else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=1))  # kept if the resume below runs out of time
    if args.resume_steps and first["exit_status"] == 0:
        result["resume"] = run_train(["train", *common, "--max-steps", str(total), "--resume"])
        (Path(args.out) / name).write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k not in ("train", "resume")}
    for part in ("train", "resume"):
        if part in result:
            brief[part] = {k: v for k, v in result[part].items() if k != "metrics"}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
