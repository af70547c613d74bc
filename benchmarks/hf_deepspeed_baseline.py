"""The stock transformers + PEFT + DeepSpeed ZeRO-3 path (ANCHORS.md, W4's third row), for same-run ratios.

What a TRL/Axolotl user gets underneath: `from_pretrained` under `HfDeepSpeedConfig` (zero.Init), LoRA r16
alpha 32 on the 7 linear layers through `peft.get_peft_model`, non-reentrant gradient checkpointing with the
model in train mode, torch AdamW, ZeRO-3 with overlap_comm and no offload, bf16, micro-batch 4 x 2048 random
tokens (labels = inputs). Launch: torchrun --nproc-per-node 2 benchmarks/hf_deepspeed_baseline.py --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = parser.parse_args()

    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    deepspeed.init_distributed("nccl")
    world = torch.distributed.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
        "train_batch_size": args.batch_size * world, "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
    }
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (makes from_pretrained use zero.Init)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(local_rank)
    times, losses = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq), generator=generator).cuda()
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    if torch.distributed.get_rank() == 0:
        per_gpu = args.batch_size * args.seq / statistics.median(times[2:])
        json.dump({"tokens_per_second_per_gpu": per_gpu, "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30,
                   "losses": losses, "workers": world}, open(args.out, "w"))


if __name__ == "__main__":
    main()
