"""Next-token cross-entropy straight from the last hidden states, in chunks: full fp32 logits never exist.

The stock path materialises logits for every position (bf16), upcasts them all to fp32, and keeps both plus
an fp32 gradient for the backward pass: at seq 2048 that is ~1 GiB for a 32k vocabulary and ~4 GiB for 128k.
Here the output head computes, chunk by chunk over the label tokens only, the loss and its gradients with
respect to the hidden states (and the head's weight, when it trains), then drops the chunk's logits. The
backward pass just scales those stored gradients. Numerics follow the stock path: bf16 logits from the
matmul, fp32 log-softmax, the gradient cast back to the compute dtype before the matmuls.

It plugs in at the output head's forward, inside the model's own forward, so every engine's hooks
(FSDP2 unshard, ZeRO-3 gather) see an ordinary call of that module.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32 (2**26, 256 MiB, set the peak of a QLoRA step)
# ...but never fewer rows than this. Each chunk's two head GEMMs read the whole [vocab, hidden] weight; with
# few rows they are memory-bound: at a 128k vocabulary, 2**24 elements are 130 rows, 16 chunks, 32 GB of
# weight reads per step. 512 rows measured 5.7% faster on W2 (Llama-3-8B, one H200) for 0.5 GiB more peak
# (benchmarks/results/*-w2-loss-chunk-variants.json); at a 32k vocabulary 2**24 elements are 524 rows anyway.
MIN_CHUNK_TOKENS = 512
# ``label_count`` meaning "every row, at fixed shapes": the loss runs over all positions and rows whose label is
# -100 weigh zero, so nothing depends on how many labels a batch has (a replayed CUDA graph needs that).
ALL_ROWS = -1


def chunk_tokens_for(vocab_size: int) -> int:
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_size)


def chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, weight_of_row: torch.Tensor | None,
                        want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed cross-entropy from its logits (in the matmul's dtype), and the gradient of that sum
    with respect to the logits, softmax - one_hot (rows weighted by ``weight_of_row``), back in the logits'
    dtype. The softmax runs in fp32 (fp64 for fp64 logits). Eagerly the fp32 copy is made and updated in
    place; compiled (``compiled_chunk_math``) the steps fuse into a few kernels that read the logits and write
    the gradient, with no fp32 copy in memory."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    wide_logits = logits.to(wide)
    log_norm = torch.logsumexp(wide_logits, dim=-1)
    losses = log_norm - wide_logits.gather(1, target[:, None]).squeeze(1)
    total = (losses if weight_of_row is None else losses * weight_of_row).sum()
    if not want_grad:
        return total, None
    # d(sum CE)/d(logits) = softmax - one_hot, in place over the fp32 logits
    grad = wide_logits.sub_(log_norm[:, None]).exp_()
    grad.scatter_add_(1, target[:, None], grad.new_full((target.size(0), 1), -1.0))
    if weight_of_row is not None:
        grad.mul_(weight_of_row[:, None])
    return total, grad.to(logits.dtype)


@functools.cache
def compiled_chunk_math():
    """chunk_loss_and_grad through torch.compile, made once per process."""
    return torch.compile(chunk_loss_and_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, label_count, compiled=False, grad_enabled=True):
        # needs_input_grad says True under torch.no_grad too: an evaluation would compute gradients it drops
        want_hidden, want_weight = (grad_enabled and wanted for wanted in ctx.needs_input_grad[:2])
        wide = torch.promote_types(hidden.dtype, torch.float32)  # the softmax runs in fp32 (or fp64 if given)
        if label_count == ALL_ROWS:
            rows, picked, keep = None, hidden, (labels != IGNORE_INDEX).to(wide)
            targets = labels.clamp(min=0)
        else:
            rows, keep = label_rows(labels, label_count), None
            picked, targets = hidden.index_select(0, rows), labels.index_select(0, rows)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad_picked = torch.empty_like(picked) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_weight else None
        math = compiled_chunk_math() if compiled else chunk_loss_and_grad
        for start in range(0, picked.size(0), chunk_tokens):
            chunk, target = picked[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            weight_of_row = None if keep is None else keep[start:start + chunk_tokens]
            chunk_total, grad_logits = math(chunk @ weight.t(), target, weight_of_row, want_hidden or want_weight)
            total += chunk_total
            if grad_logits is not None:
                grad_logits = grad_logits.to(hidden.dtype)
                if want_hidden:
                    grad_picked[start:start + chunk_tokens] = grad_logits @ weight
                if want_weight:
                    grad_weight += (grad_logits.t() @ chunk).to(wide)
        grad_hidden = None
        if want_hidden:
            grad_hidden = grad_picked if rows is None else torch.zeros_like(hidden).index_copy_(0, rows, grad_picked)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunk_token_losses_and_grad(logits: torch.Tensor, target: torch.Tensor,
                                want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """chunk_loss_and_grad row by row: each row's cross-entropy (fp32, or fp64 for fp64 logits), and its gradient
    with respect to the row's logits, softmax - one_hot, in the logits' dtype."""
    wide_logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_norm = torch.logsumexp(wide_logits, dim=-1)
    losses = log_norm - wide_logits.gather(1, target[:, None]).squeeze(1)
    if not want_grad:
        return losses, None
    grad = wide_logits.sub_(log_norm[:, None]).exp_()
    grad.scatter_add_(1, target[:, None], grad.new_full((target.size(0), 1), -1.0))
    return losses, grad.to(logits.dtype)


@functools.cache
def compiled_token_math():
    """chunk_token_losses_and_grad through torch.compile, made once per process."""
    return torch.compile(chunk_token_losses_and_grad)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] of each row whose target is not -100 (0 for the others), in
    chunks. A row's log-prob depends on its own hidden state only, so its gradient with respect to that state
    is computed with the forward, as _LinearCrossEntropy does, and the backward scales each row by its upstream
    gradient. The weight's gradient sums the rows weighted by those upstream gradients, which only the backward
    knows: where the head trains (full fine-tuning), the backward computes each chunk's logits again."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, target_count, compiled, grad_enabled):
        want_hidden, want_weight = (grad_enabled and wanted for wanted in ctx.needs_input_grad[:2])
        wide = torch.promote_types(hidden.dtype, torch.float32)
        rows = label_rows(targets, target_count)
        picked, picked_targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        logps = torch.empty(rows.size(0), dtype=wide, device=hidden.device)
        grad_picked = torch.empty_like(picked) if want_hidden else None  # d log-prob / d hidden, per row
        math = compiled_token_math() if compiled else chunk_token_losses_and_grad
        for start in range(0, picked.size(0), chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            losses, grad_logits = math(picked[chunk] @ weight.t(), picked_targets[chunk], want_hidden)
            logps[chunk] = -losses
            if want_hidden:
                grad_picked[chunk] = -(grad_logits.to(hidden.dtype) @ weight)
        ctx.save_for_backward(rows, grad_picked, *((picked, picked_targets, weight) if want_weight else ()))
        ctx.hidden_shape, ctx.chunk_tokens, ctx.math = hidden.shape, chunk_tokens, math
        device = hidden.device.type  # the backward's logits under the forward's autocast, if any
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return torch.zeros(hidden.size(0), dtype=wide, device=hidden.device).index_copy_(0, rows, logps)

    @staticmethod
    def backward(ctx, grad_output):
        rows, grad_picked, *for_weight = ctx.saved_tensors
        upstream = grad_output.index_select(0, rows)
        grad_hidden = grad_weight = None
        if grad_picked is not None:  # the product in fp32, then the compute dtype
            scaled = (grad_picked.to(upstream.dtype) * upstream[:, None]).to(grad_picked.dtype)
            grad_hidden = scaled.new_zeros(ctx.hidden_shape).index_copy_(0, rows, scaled)
        if for_weight:
            picked, picked_targets, weight = for_weight
            grad_weight = torch.zeros(weight.shape, dtype=upstream.dtype, device=weight.device)
            device, dtype, enabled = ctx.autocast
            for start in range(0, picked.size(0), ctx.chunk_tokens):
                chunk = slice(start, start + ctx.chunk_tokens)
                with torch.autocast(device, dtype, enabled=enabled):
                    logits = picked[chunk] @ weight.t()
                _, grad_logits = ctx.math(logits, picked_targets[chunk], True)
                grad_logits = (grad_logits.to(upstream.dtype) * -upstream[chunk, None]).to(picked.dtype)
                grad_weight += (grad_logits.t() @ picked[chunk]).to(upstream.dtype)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int | None = None, target_count: int | None = None,
                       compiled: bool = False) -> torch.Tensor:
    """Per row, log softmax(hidden @ weight.T)[target] (fp32; 0 where the target is -100), without a
    [rows, vocab] tensor beyond one chunk. ``hidden`` [N, d], ``weight`` [V, d], ``targets`` [N];
    ``target_count``: how many targets are not -100, when the caller knows it (saves a host-GPU sync)."""
    chunk = chunk_tokens or chunk_tokens_for(weight.size(0))
    return _LinearTokenLogps.apply(hidden, weight, targets, chunk, target_count, compiled, torch.is_grad_enabled())


def label_rows(labels: torch.Tensor, label_count: int | None = None) -> torch.Tensor:
    """Positions of the label tokens. With their number known on the host (the loop counts them on the CPU
    batch), ``nonzero_static`` finds them without waiting for the GPU: plain ``nonzero`` must copy its result
    size back, which stalls the host until the forward pass so far has run, and leaves the GPU idle while
    the host then launches the rest of the step."""
    mask = labels != IGNORE_INDEX
    if label_count is None:
        return mask.nonzero().squeeze(1)
    return torch.nonzero_static(mask, size=label_count).squeeze(1)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: int | None = None, label_count: int | None = None,
                             compiled: bool = False) -> torch.Tensor:
    """Sum over positions with ``labels != -100`` of cross-entropy(hidden @ weight.T, labels).
    ``hidden`` [N, d], ``weight`` [V, d], ``labels`` [N] (already aligned: label i is the target of row i).
    ``label_count``: how many labels are not -100, when the caller knows it (saves a host-GPU sync), or
    ALL_ROWS: every row at fixed shapes, -100 rows weighing zero (no count needed, for CUDA graphs).
    ``compiled``: each chunk's softmax and gradient through torch.compile (compiled_chunk_math)."""
    chunk = chunk_tokens or chunk_tokens_for(weight.size(0))
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, label_count, compiled, torch.is_grad_enabled())


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's logits are not a plain bias-free linear map of the last hidden states, if they are not."""
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"its config sets {name}"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output head is not a plain linear layer"
    if head.bias is not None:
        return "its output head has a bias"
    return None


class ChunkedLossHead:
    """Installed on a causal LM's output head. Inside ``computing(labels)``, the model's forward returns the
    summed loss in place of ``logits``; inside ``scoring(targets)``, each position's log-probability of its
    target ([batch, seq], for the preference objectives); outside both (generation, plain calls) the head
    behaves as before.
    ``compiled``: each chunk's softmax and gradient run through torch.compile (compiled_chunk_math), as the
    layers do under --compile."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None = None, compiled: bool = False):
        self.head = model.get_output_embeddings()
        self.chunk_tokens = chunk_tokens
        self.compiled = compiled
        self._labels: torch.Tensor | None = None
        self._count: int | None = None
        self._per_token = False
        original = self.head.forward

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            if self._labels is None:
                return original(hidden)
            labels, self._labels = self._labels, None
            rows = hidden.reshape(-1, hidden.size(-1))
            if self._per_token:
                return linear_token_logps(rows, self.head.weight, labels, self.chunk_tokens, self._count,
                                          self.compiled).view(hidden.shape[:-1])
            return linear_cross_entropy_sum(rows, self.head.weight, labels, self.chunk_tokens, self._count,
                                            self.compiled)

        self.head.forward = forward

    @contextmanager
    def computing(self, labels: torch.Tensor, label_count: int | None = None):
        """``labels`` [batch, seq] as in the batch; shifted here so position t predicts label t + 1.
        ``label_count``: the number of shifted labels that are not -100, if known on the host."""
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        self._labels, self._count = shifted.reshape(-1), label_count
        try:
            yield
        finally:
            self._labels = self._count = None

    @contextmanager
    def scoring(self, targets: torch.Tensor, target_count: int | None = None):
        """``targets`` [batch, seq]: the token whose log-probability each position gives (already aligned:
        position t's target, usually token t + 1), -100 where none is wanted; the model's forward then returns
        those log-probabilities [batch, seq], fp32, 0 at -100. ``target_count``: how many are not -100."""
        self._labels, self._count, self._per_token = targets.reshape(-1), target_count, True
        try:
            yield
        finally:
            self._labels = self._count = None
            self._per_token = False


def install_chunked_loss(model: torch.nn.Module, compiled: bool = False) -> tuple[ChunkedLossHead | None, str | None]:
    """The head, or None and the reason the model keeps the stock loss. ``compiled``: see ChunkedLossHead."""
    reason = unsupported_reason(model)
    return (None, reason) if reason else (ChunkedLossHead(model, compiled=compiled), None)
