"""trainer/swiglu_kernel.py run on the CPU through Triton's interpreter: the product and, in one
pass, the product again with d gate and d up, against torch's formulas in fp32 (silu(g) u;
d up = d silu(g); d gate = torch's silu_backward of d u), each output rounded once; d gate
written over the product's gradient; a length that is not a multiple of the block.
"""

from __future__ import annotations

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the SwiGLU kernels are not tested (pip install triton)")

from trainer.swiglu_kernel import BLOCK  # noqa: E402

# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.swiglu_kernel import swiglu, swiglu_backward
cases, out = torch.load(sys.argv[1]), {}
for name, (grad, gate, up) in cases.items():
    grad = grad.clone()
    product, grad_gate, grad_up = swiglu_backward(grad, gate, up)
    out[name] = {"forward": swiglu(gate, up), "product": product, "grad_gate": grad_gate, "grad_up": grad_up,
                 "in_place": grad_gate.data_ptr() == grad.data_ptr()}
torch.save(out, sys.argv[2])
"""

g = torch.Generator().manual_seed(0)
N = 2 * BLOCK + 37  # three programs, the last one partial


def _case(shape, dtype):
    return tuple((torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(3))


CASES = {"fp32": _case((N,), torch.float32), "bf16": _case((3, N // 3), torch.bfloat16)}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("swiglu_kernel"))


def _reference(grad, gate, up):
    """torch's formulas in fp32 (what torch.compile fuses), each result rounded to the inputs' dtype."""
    d, g32, u = grad.float(), gate.float(), up.float()
    silu = torch.nn.functional.silu(g32)
    grads = torch.ops.aten.silu_backward(d * u, g32), d * silu
    return {"product": (silu * u).to(gate.dtype), "grad_gate": grads[0].to(gate.dtype),
            "grad_up": grads[1].to(gate.dtype)}


@pytest.mark.parametrize("name", list(CASES))
def test_product_and_gradients_as_torch(interpreted, name):
    """fp32 within a few ulps (the interpreter's exp is numpy's); bf16 within one bf16 step, since
    the interpreter truncates fp32 to bf16 where the GPU rounds to nearest
    (test_as_torch_on_cuda checks the GPU's rounding)."""
    tol = {"fp32": {"rtol": 1e-6, "atol": 1e-6}, "bf16": {"rtol": 2**-7, "atol": 1e-30}}[name]
    got, want = interpreted[name], _reference(*CASES[name])
    for key in ("product", "grad_gate", "grad_up"):
        torch.testing.assert_close(got[key], want[key], **tol)
    assert torch.equal(got["forward"], got["product"])  # forward and backward make the same product


@pytest.mark.parametrize("name", list(CASES))
def test_grad_gate_takes_the_products_gradients_memory(interpreted, name):
    assert interpreted[name]["in_place"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_as_torch_on_cuda(name):
    """Against torch's fp32 formulas rounded once: bf16 within one bf16 step (the kernel's
    sigmoid and torch's may differ in fp32's last bits), fp32 within 1e-5 (d gate's factor
    1 + g (1 - sigmoid(g)) cancels near g = -1.28), the product identical both ways."""
    from trainer.swiglu_kernel import swiglu, swiglu_backward

    grad, gate, up = (t.cuda() for t in CASES[name])
    want = _reference(grad, gate, up)
    product, grad_gate, grad_up = swiglu_backward(grad.clone(), gate, up)
    tol = {"rtol": 2**-7, "atol": 1e-30} if gate.dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for key, got in (("product", product), ("grad_gate", grad_gate), ("grad_up", grad_up)):
        torch.testing.assert_close(got, want[key], **tol)
    assert torch.equal(swiglu(gate, up), product)
