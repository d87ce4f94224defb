"""trainer/rope_kernel.py's Triton kernel against trainer/draft.py `_apply_rope` (eager torch, in
fp32), run on the CPU through Triton's interpreter: forward and backward, q as a view of
[B, S, H, d] memory and k laid out [B, H, S, d], a head count that is not a power of two, the
output's memory order; also a rotation worked by hand and which shapes the kernel takes.
"""

from __future__ import annotations

import math

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the Triton RoPE kernel is not tested (pip install triton)")

from trainer.draft import _apply_rope, rope  # noqa: E402
from trainer.rope_kernel import fits  # noqa: E402

# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.rope_kernel import _rotated
cases = torch.load(sys.argv[1])
torch.save({name: (_rotated(x, cos, sin, backward=False), _rotated(g, cos, sin, backward=True))
            for name, (x, g, cos, sin) in cases.items()}, sys.argv[2])
"""


def _case(batch, heads, seq, d, seed, heads_first=False):
    """(x, a gradient for it, cos, sin): bf16, x and the gradient as [B, H, S, d] views of
    [B, S, H, d] memory unless heads_first; the draft's own cos/sin tables."""
    g = torch.Generator().manual_seed(seed)

    def made():
        if heads_first:
            return torch.randn(batch, heads, seq, d, generator=g).bfloat16()
        return torch.randn(batch, seq, heads, d, generator=g).bfloat16().transpose(1, 2)

    cos, sin = rope(seq, d, 10000.0, "cpu", torch.bfloat16)
    return made(), made(), cos, sin


def _hand_case():
    """One head, d = 2, one position at angle a: cos = (cos a, cos a), sin = (sin a, sin a).
    x = (1, 0) turns to (cos a, sin a); the gradient g = (1, 0) goes back through the transpose
    of the rotation, (g1 c + g2 s, g2 c - g1 s) = (cos a, -sin a). a = pi/3 makes cos a = 1/2, exact."""
    a = math.pi / 3
    cos = torch.full((1, 2), math.cos(a)).bfloat16()
    sin = torch.full((1, 2), math.sin(a)).bfloat16()
    one = torch.tensor([1.0, 0.0]).bfloat16().reshape(1, 1, 1, 2)
    return one, one.clone(), cos, sin


CASES = {"q-view-grouped": _case(2, 4, 7, 16, seed=1), "k-heads-first": _case(1, 2, 5, 32, seed=2, heads_first=True),
         "three-heads": _case(1, 3, 6, 8, seed=3), "hand": _hand_case()}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's (rotated x, gradient taken back) from the kernel run by Triton's interpreter."""
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("rope_kernel"))


def _eager(x, g, cos, sin):
    """_apply_rope in fp32 and its gradient for g, by autograd."""
    x32 = x.float().requires_grad_()
    out = _apply_rope(x32, cos.float(), sin.float())
    (grad,) = torch.autograd.grad(out, x32, g.float())
    return out, grad


@pytest.mark.parametrize("name", ["q-view-grouped", "k-heads-first", "three-heads"])
def test_matches_eager_rope_forward_and_backward(interpreted, name):
    out, grad = interpreted[name]
    want_out, want_grad = _eager(*CASES[name])
    for mine, want in ((out, want_out), (grad, want_grad)):
        assert mine.dtype == torch.bfloat16 and mine.shape == want.shape
        # one bf16 rounding of the fp32 result: a unit in the last place, since the interpreter's
        # conversion truncates where the GPU's rounds to nearest (half a unit, the GPU test's bound)
        torch.testing.assert_close(mine.float(), want, rtol=2**-7, atol=1e-6)
        assert mine.transpose(1, 2).is_contiguous(), "laid out [B, S, H, d] in memory, as q and k arrive"


def test_by_hand(interpreted):
    out, grad = interpreted["hand"]
    c, s = float(torch.tensor(0.5).bfloat16()), float(torch.tensor(math.sin(math.pi / 3)).bfloat16())
    assert out.float().flatten().tolist() == pytest.approx([c, s], abs=2**-8)
    assert grad.float().flatten().tolist() == pytest.approx([c, -s], abs=2**-8)


def test_which_shapes_the_kernel_takes():
    x = torch.zeros(1, 2, 4, 8)
    cos, sin = rope(4, 8, 10000.0, "cpu", torch.float32)
    assert fits(x, cos, sin)
    assert not fits(torch.zeros(1, 2, 4, 12), *rope(4, 12, 10000.0, "cpu", torch.float32))  # d / 2 = 6
    assert not fits(x, cos[None], sin[None])  # a broadcast table
    assert not fits(x, cos.t().contiguous().t(), sin.t().contiguous().t())  # rows not contiguous


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_matches_eager_on_gpu():
    """The draft's head shape (32 heads, d 128) at 1000 positions, through autograd."""
    from trainer.rope_kernel import apply_rope

    x, g, cos, sin = (t.cuda() for t in _case(2, 32, 1000, 128, seed=4))
    x.requires_grad_()
    out = apply_rope(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, g)
    want_out, want_grad = _eager(x.detach(), g, cos, sin)
    torch.testing.assert_close(out.float(), want_out, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2**-8, atol=1e-5)
