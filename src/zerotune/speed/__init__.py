"""Speed features: each changes how fast a step runs, never what it computes.

    compile.py            regional torch.compile of the decoder layers; graph-break check after the first step
    fused_projections.py  q/k/v and gate/up as one matmul with the LoRA matrices stacked in (checked at install)
    swiglu.py             silu(gate) * up with its backward as one kernel (used by fused projections)
    chunked_loss.py       cross-entropy from the last hidden states in chunks: no full fp32 logits
    nf4.py                QLoRA's 4-bit matmul in torch ops, so it compiles with its layer
    plain_causal.py       the host's "no mask needed" hint to transformers' SDPA mask builder (for step graphs)
    step_graphs.py        a whole training step captured and replayed as one CUDA graph
"""
