"""zerotune.speed.swiglu: silu(gate) * up with its backward as one op (a Triton kernel on CUDA: tests/test_gpu.py). On
CPU the op runs the torch formula; these check that formula against autograd's own SwiGLU gradient, and that the
op traces and compiles."""

from __future__ import annotations

import torch

from zerotune.speed.swiglu import silu_mul, swiglu_backward


def _own_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


def test_values_and_gradients_equal_autograds_swiglu_in_fp64():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 5, 2 * 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(silu_mul(gate_up), _own_swiglu(gate_up), rtol=0, atol=0)
    (expected,) = torch.autograd.grad(_own_swiglu(gate_up), gate_up, grad)
    (got,) = torch.autograd.grad(silu_mul(gate_up), gate_up, grad)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    assert torch.autograd.gradcheck(silu_mul, (gate_up,))


def test_16_bit_inputs_get_fp32_math_rounded_once():
    """bf16 in, bf16 out, computed in fp32: within one bf16 rounding of the fp32 gradient."""
    torch.manual_seed(0)
    gate_up, grad = torch.randn(64, 2 * 96, dtype=torch.bfloat16), torch.randn(64, 96, dtype=torch.bfloat16)
    got = swiglu_backward(gate_up, grad)
    leaf = gate_up.float().requires_grad_()
    (expected,) = torch.autograd.grad(_own_swiglu(leaf), leaf, grad.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-6)


def test_compiled_gradients_equal_eager():
    torch.manual_seed(0)
    gate_up = torch.randn(3, 2 * 16, requires_grad=True)
    weight = torch.randn(16, 4)

    def loss(x):
        return (silu_mul(x) @ weight).square().sum()

    (eager,) = torch.autograd.grad(loss(gate_up), gate_up)
    (compiled,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(gate_up), gate_up)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
