"""``zerotune bench``: one named workload, run twice in the same process tree: the stock HF+PEFT baseline
(transformers model + ``peft.get_peft_model``, eager, SDPA, the model's own loss, fused AdamW) and zerotune's
own training loop (``zerotune.train.run`` through the normal launcher) on the same architecture, random
weights from the same seed, the same token data and the same settings. Writes one JSON result.

Workloads: W1 Llama-2-7B arch at seq 2048 (mb1 no checkpointing; mb4 checkpointing),
W2 Llama-3-8B arch (128k vocabulary), W3 short Alpaca-like examples (packed vs pad-to-longest, effective
tokens/s), W4 two GPUs, and QLoRA at mb1 and mb4. ``--tiny`` swaps in a tiny model, short rows and the CPU so
the harness itself is tested in CI (the speed is meaningless there).

  workloads.py  the workloads, their architectures and token data, LoRA-MFU's accounting
  baseline.py   the HF+PEFT side (one process per GPU, torch DDP when there are several)
  harness.py    the driver: model and data on disk, both sides, the result file and its summary
  timing.py     tokens/s at the median step and the steps' spread, the same estimator for both sides
  power.py      GPU 0's watts and SM clock through NVML while the sides run
"""

from zerotune.bench.harness import provenance, run_bench, run_config, summary, write_model_dir
from zerotune.bench.timing import spread, step_spread
from zerotune.bench.workloads import ARCHITECTURES, WORKLOADS, Workload, lora_mfu, matmul_weights, token_records

__all__ = ["ARCHITECTURES", "WORKLOADS", "Workload", "lora_mfu", "matmul_weights", "provenance", "run_bench",
           "run_config", "spread", "step_spread", "summary", "token_records", "write_model_dir"]
