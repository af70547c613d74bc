"""The stacked matmuls of zerotune.speed.fused_projections: a group's frozen weights and copies of its LoRA
matrices in one stacked weight, multiplied in one matmul each way.

- q/k/v and gate/up (output wider than input): [frozen weights | block-diagonal LoRA-B], B in columns.
  Forward, x A^T (a rank-wide matmul), then one matmul [x, scaling x A^T] @ stacked^T sums the frozen output
  and the adapters' update inside the matmul, so no full-size update tensor is written and read back.
  Backward, one matmul grad @ stacked gives x's gradient through the frozen weights and x A^T's gradient
  together.
- o_proj and down_proj: [frozen weights; LoRA-A], A in rows. One matmul x @ stacked^T yields the frozen output
  and x A^T together, and the LoRA-B matmul runs against the scaled B; backward, one matmul gives the input's
  gradient through the frozen weights and the adapters at once (grad @ stacked).
Against PEFT's path this saves, per group, the full-size tensor of the adapters' input gradient and its add,
and for q/k/v and gate/up also the forward's update tensor. A's and B's own gradients are small matmuls.

StackedLinear and WideLinear are autograd Functions, for eager and compiled layers. Checkpointed layers use
custom ops instead (why: the comment above lora_linear): lora_linear, one member's frozen matmul plus its LoRA-B
update given x A^T (o_proj, down_proj), and wide_linear, WideLinear's computation. Everything here takes
tensors and numbers only; which modules form a group, and when a group may run stacked, is fused_projections'.
"""

from __future__ import annotations

import torch


class StackedLinear(torch.autograd.Function):
    """x @ stacked^T, where stacked = [frozen weights; LoRA-A matrices]: one matmul yields the frozen output
    and x A^T, and one yields the input's gradient through both (grad_y @ stacked). The A rows' gradient is
    the only extra matmul: grad_A = grad_xA^T x. ``weights_a`` are the A parameters whose values the
    stacked rows hold (copied in just before), passed so that their gradients reach them."""

    @staticmethod
    def forward(ctx, x, stacked, frozen_rows, *weights_a):
        x_c = x.to(stacked.dtype)
        ctx.save_for_backward(x_c, stacked)
        ctx.frozen_rows, ctx.x_dtype = frozen_rows, x.dtype
        ctx.a_shapes = [(w.shape[0], w.dtype) for w in weights_a]
        return torch.nn.functional.linear(x_c, stacked)  # [frozen output, x A^T, zero padding]

    @staticmethod
    def backward(ctx, grad_y):
        x_c, stacked = ctx.saved_tensors
        grad_y = grad_y.to(stacked.dtype)
        grad_x = (grad_y @ stacked).to(ctx.x_dtype)
        rows = [r for r, _ in ctx.a_shapes]
        grad_xa = grad_y[..., ctx.frozen_rows:ctx.frozen_rows + sum(rows)].reshape(-1, sum(rows))
        grad_a = grad_xa.t() @ x_c.reshape(-1, x_c.shape[-1])
        grads_a = [g.to(dtype) for g, (_, dtype) in zip(grad_a.split(rows), ctx.a_shapes)]
        return (grad_x, None, None, *grads_a)


class WideLinear(torch.autograd.Function):
    """[x, scaling x A^T] @ stacked^T, where stacked = [frozen weights | block-diagonal LoRA-B matrices]: the
    adapters' update is summed inside the frozen matmul, so no full-size update tensor is written and read
    back, forward or backward. The scaling multiplies the rank-wide x A^T, not B, so that refreshing the stacked
    B is a plain copy of the parameters. Backward, one matmul gives the gradients of x (through the frozen
    weights) and of x A^T together (grad_y @ stacked); then x's gradient through A (a rank-wide matmul added to
    it), A's and B's. ``weights`` are the A parameters, then the B ones, whose values the stacked columns hold."""

    @staticmethod
    def forward(ctx, x, stacked, blocks, scalings, *weights):
        x_c, xa, out = _wide_forward(x, stacked, blocks, scalings, weights[:len(blocks)])
        # x and x A^T kept apart, not their concatenation: x is the layer's (the compiler may recompute it from
        # the norm's input); A itself, whose cast copy is rebuilt
        ctx.save_for_backward(x_c, xa, stacked, *weights[:len(blocks)])
        ctx.blocks, ctx.scalings, ctx.x_dtype = blocks, scalings, x.dtype
        ctx.dtypes = [w.dtype for w in weights]
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x_c, xa, stacked, *weights_a = ctx.saved_tensors
        grad_x, grads = _wide_grads(grad_y, x_c, xa, stacked, weights_a, ctx.blocks, ctx.scalings, ctx.dtypes,
                                    ctx.x_dtype, ctx.needs_input_grad[0])
        return (grad_x, None, None, None, *grads)


def _wide_forward(x, stacked, blocks, scalings, weights_a):
    """x in the stacked dtype, x A^T, and [x, scaling x A^T, zero padding] @ stacked^T."""
    dtype = stacked.dtype
    x_c = x.to(dtype)
    xa = torch.nn.functional.linear(x_c, _cat_a(weights_a, dtype))
    padding = xa.new_zeros(*xa.shape[:-1], stacked.shape[1] - x_c.shape[-1] - xa.shape[-1])
    return x_c, xa, torch.nn.functional.linear(torch.cat([x_c, *_scaled(xa, blocks, scalings), padding], -1), stacked)


def _wide_grads(grad_y, x_c, xa, stacked, weights_a, blocks, scalings, dtypes, x_dtype, needs_grad_x):
    """x's gradient (None unless ``needs_grad_x``), then A's and B's gradients in ``dtypes``, for _wide_forward."""
    a = _cat_a(weights_a, stacked.dtype)
    features, shape, rank = x_c.shape[-1], x_c.shape, a.shape[0]
    grad_y = grad_y.to(stacked.dtype).reshape(-1, stacked.shape[0])
    x_c, xa = x_c.reshape(-1, features), xa.reshape(-1, a.shape[0])
    grad_x = None
    if needs_grad_x:
        both = grad_y @ stacked
        grad_xa = torch.cat(_scaled(both[:, features:features + rank], blocks, scalings), -1)
        # a sum, not addmm: addmm into a new tensor first copies its strided input there (a full-size copy
        # kernel per group on the GPU); compiled, the sum is read by the norm's backward instead
        grad_x = (both[:, :features] + grad_xa @ a).to(x_dtype).reshape(shape)
    else:  # the first layer's input: only x A^T needs a gradient
        grad_xa = torch.cat(_scaled(grad_y @ stacked[:, features:features + rank], blocks, scalings), -1)
    grad_a = grad_xa.t() @ x_c
    grad_b = grad_y.t() @ xa
    grads_a, grads_b = [], []
    for (row, row_end, col, col_end), scale in zip(blocks, scalings):
        grads_a.append(grad_a[col:col_end])
        grads_b.append(grad_b[row:row_end, col:col_end] * scale)
    return grad_x, [g.to(dtype) for g, dtype in zip(grads_a + grads_b, dtypes)]


# In checkpointed layers the groups run as custom ops, not autograd.Functions (and SwiGLU as torch ops): torch
# 2.11's compiler gives the ops inside an autograd.Function no recompute tags, so a compiled checkpoint kept their
# inputs and outputs alive (an H200 W1-ckpt step: 36.3 GiB peak, not 17.7; pytorch/pytorch#177396, fixed later).
# A custom op is one node of the layer's graph, tagged like the rest; its backward is traced as usual. What the
# backward reads must be cheap to recompute: o's and down's x A^T comes from its own rank-wide matmul outside the
# op (the recompute then skips the frozen matmul, whose output the backward does not read), and the op adds the
# LoRA-B update.
@torch.library.custom_op("zerotune::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, xa: torch.Tensor, stacked: torch.Tensor, frozen_rows: int, scaling: float,
                weight_a: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """x W^T + scaling (x A^T) B^T for one member (o_proj or down_proj) whose stacked weight is [W; A; 0],
    given x A^T. Backward: x's gradient through W and A in one matmul, and A's and B's."""
    dtype = stacked.dtype
    x_c = x.to(dtype).reshape(-1, x.shape[-1])
    out = x_c @ stacked[:frozen_rows].t()
    out.addmm_(xa.reshape(-1, xa.shape[-1]).to(dtype), weight_b.to(dtype).t(), alpha=scaling)
    return out.reshape(*x.shape[:-1], frozen_rows)


@lora_linear.register_fake
def _(x, xa, stacked, frozen_rows, scaling, weight_a, weight_b):
    return x.new_empty(*x.shape[:-1], frozen_rows, dtype=stacked.dtype)


def _lora_linear_setup(ctx, inputs, output):
    x, xa, stacked, ctx.frozen_rows, ctx.scaling, weight_a, weight_b = inputs
    ctx.save_for_backward(x, xa, stacked, weight_b)
    ctx.a_dtype = weight_a.dtype


def _lora_linear_backward(ctx, grad_y):
    x, xa, stacked, weight_b = ctx.saved_tensors
    dtype, rank = stacked.dtype, xa.shape[-1]
    grad_y = grad_y.to(dtype).reshape(-1, grad_y.shape[-1])
    grad_xa = (grad_y @ weight_b.to(dtype)) * ctx.scaling
    padding = grad_xa.new_zeros(grad_xa.shape[0], stacked.shape[0] - ctx.frozen_rows - rank)
    x_c = x.to(dtype).reshape(-1, x.shape[-1])
    grad_x = (torch.cat([grad_y, grad_xa, padding], -1) @ stacked).to(x.dtype).reshape(x.shape)
    grad_a = (grad_xa.t() @ x_c).to(ctx.a_dtype)
    grad_b = ((grad_y.t() @ xa.reshape(-1, rank).to(dtype)) * ctx.scaling).to(weight_b.dtype)
    return grad_x, None, None, None, None, grad_a, grad_b


lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)


@torch.library.custom_op("zerotune::wide_linear", mutates_args=())
def wide_linear(x: torch.Tensor, stacked: torch.Tensor, blocks: list[int], scalings: list[float],
                weights_a: list[torch.Tensor], weights_b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """WideLinear as a custom op: the output and x A^T (which its backward reads). ``blocks`` flattened, four
    numbers per member; ``weights_b`` only route B's gradients (the stacked columns hold their values)."""
    _, xa, out = _wide_forward(x, stacked, _unflat(blocks), scalings, weights_a)
    return out, xa


@wide_linear.register_fake
def _(x, stacked, blocks, scalings, weights_a, weights_b):
    rank = sum(w.shape[0] for w in weights_a)
    return (x.new_empty(*x.shape[:-1], stacked.shape[0], dtype=stacked.dtype),
            x.new_empty(*x.shape[:-1], rank, dtype=stacked.dtype))


def _wide_linear_setup(ctx, inputs, output):
    x, stacked, blocks, ctx.scalings, weights_a, weights_b = inputs
    ctx.save_for_backward(x, output[1], stacked, *weights_a)
    ctx.blocks, ctx.members = _unflat(blocks), len(weights_a)
    ctx.dtypes = [w.dtype for w in weights_a + weights_b]


def _wide_linear_backward(ctx, grad_y, grad_xa):  # x A^T is for the backward only: grad_xa is unused
    x, xa, stacked, *weights_a = ctx.saved_tensors
    grad_x, grads = _wide_grads(grad_y, x.to(stacked.dtype), xa, stacked, weights_a, ctx.blocks, ctx.scalings,
                                ctx.dtypes, x.dtype, ctx.needs_input_grad[0])
    return grad_x, None, None, None, grads[:ctx.members], grads[ctx.members:]


wide_linear.register_autograd(_wide_linear_backward, setup_context=_wide_linear_setup)


def _unflat(blocks: list[int]) -> list[tuple]:
    return [tuple(blocks[i:i + 4]) for i in range(0, len(blocks), 4)]


def _scaled(columns: torch.Tensor, blocks, scalings) -> list[torch.Tensor]:
    """Each member's rank columns of ``columns`` times its scaling (compiled, fused into their consumer)."""
    return [columns[..., col:col_end] * scale for (_, _, col, col_end), scale in zip(blocks, scalings)]


def _cat_a(weights_a, dtype) -> torch.Tensor:
    return torch.cat([w.to(dtype) for w in weights_a])
