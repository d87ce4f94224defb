"""trainer/add_kernel.py run on the CPU through Triton's interpreter: total += part in place as
torch's add_ gives it (bf16 into bf16, bf16 into fp32, fp32 into fp32, a length that is not a
multiple of the block, a row slice of a larger table as the embedding projection passes it),
and which tensors the kernel takes.
"""

from __future__ import annotations

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the add kernel is not tested (pip install triton)")

from trainer.add_kernel import BLOCK, fits  # noqa: E402

# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.add_kernel import add_into
cases = torch.load(sys.argv[1])
out = {}
for name, (total, part) in cases.items():
    total = total.clone()
    target = total[:, 2 : 2 + part.shape[1]] if total.shape != part.shape else total
    add_into(target, part)
    out[name] = total
torch.save(out, sys.argv[2])
"""

g = torch.Generator().manual_seed(0)
N = 2 * BLOCK + 37  # three programs, the last one partial
CASES = {
    # sixteenths in [-4, 4): their bf16 sums are exact, so the interpreter's truncation to bf16
    # cannot differ from the GPU's rounding to nearest
    "bf16-into-bf16": (torch.randint(-64, 64, (N,), generator=g).bfloat16() / 16,
                       torch.randint(-64, 64, (N,), generator=g).bfloat16() / 16),
    "bf16-into-fp32": (torch.randn(N, generator=g), torch.randn(N, generator=g).bfloat16()),
    "fp32-into-fp32": (torch.randn(3, 7, N // 21, generator=g), torch.randn(3, 7, N // 21, generator=g)),
    # the embedding projection's shape: step k's rows of a [1, S + L - 1, out] table
    "rows-of-a-table": (torch.randn(1, 40, 96, generator=g), torch.randn(1, 33, 96, generator=g).bfloat16()),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("add_kernel"))


@pytest.mark.parametrize("name", list(CASES))
def test_adds_as_torch_add_(interpreted, name):
    total, part = CASES[name]
    want = total.clone()
    target = want[:, 2 : 2 + part.shape[1]] if total.shape != part.shape else want
    target.add_(part)
    assert torch.equal(interpreted[name], want)
    if name == "rows-of-a-table":  # rows outside the slice untouched
        assert torch.equal(interpreted[name][:, :2], total[:, :2])
        assert torch.equal(interpreted[name][:, 35:], total[:, 35:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_adds_as_torch_add_on_cuda_bit_for_bit(name):
    from trainer.add_kernel import add_into

    total, part = (t.cuda() for t in CASES[name])
    got, want = total.clone(), total.clone()
    for t in (got, want):
        target = t[:, 2 : 2 + part.shape[1]] if total.shape != part.shape else t
        if t is got:
            add_into(target, part)
        else:
            target.add_(part)
    bits = torch.int16 if total.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


def test_fits_contiguous_floating_tensors_of_one_shape():
    total = torch.zeros(4, 6)
    assert fits(total, torch.zeros(4, 6, dtype=torch.bfloat16))
    assert fits(torch.zeros(1, 9, 6)[:, 2:6], torch.zeros(1, 4, 6))  # batch 1 rows: contiguous
    assert not fits(torch.zeros(2, 9, 6)[:, 2:6], torch.zeros(2, 4, 6))  # batch 2 rows: strided
    assert not fits(total, torch.zeros(6, 4).T)
    assert not fits(total, torch.zeros(4, 5))
    assert not fits(torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 6))
