"""trainer/rescale_kernel.py run on the CPU through Triton's interpreter: x * factor in place as
torch's mul_ gives it (bf16 and fp32, a length that is not a multiple of the block), x's memory
left as it was when the factor is 1, and which tensors the kernel takes. Also that in a plain
lean step the fused head is handed exactly the weight it made its gradients for, so every
rescale it asks for is by 1 (the case the kernel skips).
"""

from __future__ import annotations

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the rescale kernel is not tested (pip install triton)")

from trainer.rescale_kernel import BLOCK, fits  # noqa: E402

# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.rescale_kernel import scale_unless_one
cases = torch.load(sys.argv[1])
torch.save({name: scale_unless_one(x.clone(), factor) for name, (x, factor) in cases.items()}, sys.argv[2])
"""

g = torch.Generator().manual_seed(0)
N = 2 * BLOCK + 37  # three programs, the last one partial
CASES = {
    "bf16-half": (torch.randn(N, generator=g).bfloat16(), torch.tensor(0.5)),
    "bf16-odd": (torch.randn(3, 7, N // 21, generator=g).bfloat16(), torch.tensor(1 / 3)),
    "fp32-odd": (torch.randn(N, generator=g), torch.tensor(0.37)),
    # NaN is not NaN * 1 bit for bit on every path: untouched memory keeps its exact bits
    "bf16-one": (torch.tensor([float("nan"), -0.0, 3.0] * 5).bfloat16(), torch.tensor(1.0)),
    "fp32-one": (torch.randn(N, generator=g), torch.tensor(1.0)),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("rescale_kernel"))


def _as_torch_on_cuda(x, factor):
    """torch's x.mul_(factor) as CUDA takes it: a 0-dim CUDA factor rounded to x's dtype first
    (torch on the CPU keeps it fp32), the product in fp32, rounded to x's dtype."""
    return (x.float() * factor.to(x.dtype).float()).to(x.dtype)


@pytest.mark.parametrize("name", ["bf16-half", "bf16-odd", "fp32-odd"])
def test_scales_as_torch_mul(interpreted, name):
    """Equal in fp32 and for a factor of 1/2; for 1/3 in bf16 within two bf16 roundings (the
    factor's and the product's), since the interpreter truncates fp32 to bf16 where the GPU
    rounds to nearest as torch does (test_scales_as_torch_mul_on_cuda checks the bits there)."""
    x, factor = CASES[name]
    want = _as_torch_on_cuda(x, factor)
    if name == "bf16-odd":
        torch.testing.assert_close(interpreted[name], want, rtol=2**-6, atol=0)
    else:
        assert torch.equal(interpreted[name], want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_scales_as_torch_mul_on_cuda(name):
    from trainer.rescale_kernel import scale_unless_one

    x, factor = (t.cuda() for t in CASES[name])
    got = scale_unless_one(x.clone(), factor)
    want = x.clone().mul_(factor) if float(factor) != 1.0 else x
    bits = torch.int16 if x.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("name", ["bf16-one", "fp32-one"])
def test_factor_one_leaves_the_bits(interpreted, name):
    x, _ = CASES[name]
    assert torch.equal(interpreted[name].view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32),
                       x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32))


def test_fits_contiguous_floating_tensors_and_one_element_factors():
    x = torch.zeros(4, 6)
    assert fits(x, torch.tensor(2.0))
    assert not fits(x.T, torch.tensor(2.0))  # not contiguous
    assert not fits(torch.zeros(4, dtype=torch.long), torch.tensor(2.0))
    assert not fits(x, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_lean_step_rescales_the_head_by_exactly_one(monkeypatch, dtype):
    """One micro-batch: d loss / d summed is the step's weight in fp32, the same fp32 the head
    made its gradients with, so backward's factor is 1.0 to the bit for every rescaled tensor
    (the hidden's gradient at each step, the head and norm weights' sums at the last). Halved
    (two micro-batches), the factor is a half and the rescale is made."""
    from test_lean_draft import _fused_draft_and_inputs

    from trainer import head_loss

    factors = []
    rescaled = head_loss._rescaled

    def recording(total, factor):
        if total is not None:
            factors.append(float(factor))
        return rescaled(total, factor)

    monkeypatch.setattr(head_loss, "_rescaled", recording)
    draft, inputs = _fused_draft_and_inputs(dtype)
    ttt = inputs[2]
    assert draft.head_grad_in_forward
    loss, _ = draft(*inputs)
    loss.backward()
    assert len(factors) == ttt + 2 and set(factors) == {1.0}
    factors.clear()
    loss, _ = draft(*inputs)
    (loss / 2).backward()
    assert len(factors) == ttt + 2 and all(f == pytest.approx(0.5, rel=1e-6) for f in factors)
