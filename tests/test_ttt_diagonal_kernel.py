"""trainer/ttt_diagonal_kernel.py's Triton kernels against trainer/ttt_attention.py's eager
`_merge_diagonal` and `_diagonal_backward`, run on the CPU through Triton's interpreter: bf16
inputs, one key, three keys and more keys than a launch has slots (chunked), grouped and plain
heads, a sequence that is not a multiple of the block, q as a view of [B, S, H, d] memory, keys
and values with their own strides. Also a case worked by hand, forward and backward.
"""

from __future__ import annotations

import math

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the Triton diagonal kernels are not tested (pip install triton)")

from trainer import ttt_attention  # noqa: E402
from trainer.ttt_diagonal_kernel import SLOTS, merge_diagonal  # noqa: E402

# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.ttt_diagonal_kernel import diagonal_backward, merge_diagonal
cases = torch.load(sys.argv[1])
torch.save({name: (merge_diagonal(*merge), diagonal_backward(*backward))
            for name, (merge, backward) in cases.items()}, sys.argv[2])
"""


def _random_case(batch, heads, kv_heads, seq, d, n, seed, lse_shift=0.0):
    """(merge's arguments, backward's arguments): bf16 q as a view of [B, S, H, d] memory, the
    causal part's out and lse (its lse near the diagonal scores, so both shares weigh, or
    lse_shift away from them, alternately above and below, where e^lse_c would overflow fp32 or
    vanish beside them unless the merge keeps a running max), n keys and
    values; key 1 a view of [B, S, Hkv, d] memory (strides of its own), value 2 every other element
    of a wider last dim (a strided head dim, copied). Backward's out and lse are eager merge's."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).bfloat16()

    q = randn(batch, seq, heads, d).transpose(1, 2)
    out_c, lse_c = randn(batch, heads, seq, d), torch.randn(batch, heads, seq, generator=g) + 1
    lse_c += lse_shift * (1 - 2 * (torch.arange(seq) % 2))
    keys = [randn(batch, kv_heads, seq, d) for _ in range(n)]
    values = [randn(batch, kv_heads, seq, d) for _ in range(n)]
    if n > 1:
        keys[1] = randn(batch, seq, kv_heads, d).transpose(1, 2)
    if n > 2:
        values[2] = randn(batch, kv_heads, seq, 2 * d)[..., ::2]
    scale = d**-0.5
    merge = (q, out_c, lse_c, keys, values, scale)
    out, lse = ttt_attention._merge_diagonal(*merge)
    dout, dq_causal = randn(batch, heads, seq, d), randn(batch, heads, seq, d)
    return merge, (dout, q, out, lse, keys, values, dq_causal, scale)


def _hand_case():
    """One head, d = 2, one position. Causal part: lse 0, out [1, 0]. One key with score
    q . k = [0, 1] . [1, 0] = 0 and value [0, 1]: weights e^0 / (e^0 + e^0) = 1/2 each, so
    out = [1/2, 1/2], lse = log 2. Backward with dout [1, 0], dq_causal 0, scale 1:
    delta = dout . out = 1/2, p = e^(0 - log 2) = 1/2, ds = p (dout . v - delta) = -1/4;
    dq = ds k = [-1/4, 0], dk = ds q = [0, -1/4], dv = p dout = [1/2, 0]."""
    def t(*values):
        return torch.tensor(values, dtype=torch.bfloat16).reshape(1, 1, 1, len(values))

    q, k, v = t(0.0, 1.0), t(1.0, 0.0), t(0.0, 1.0)
    merge = (q, t(1.0, 0.0), torch.zeros(1, 1, 1), [k], [v], 1.0)
    out, lse = t(0.5, 0.5), torch.full((1, 1, 1), math.log(2))
    return merge, (t(1.0, 0.0), q, out, lse, [k], [v], t(0.0, 0.0), 1.0)


# batch, heads, kv heads, positions (37: a partial last block), head dim, keys
SHAPES = {"one-key-grouped": (2, 4, 2, 37, 16, 1), "three-keys-plain-heads": (1, 2, 2, 37, 32, 3),
          "chunked-grouped": (1, 4, 2, 37, 16, SLOTS + 2)}
CASES = {**{name: _random_case(*shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())},
         "far-causal-lse": _random_case(1, 2, 1, 9, 16, 2, seed=9, lse_shift=200.0),
         "hand": _hand_case()}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's ((out, lse), (dq, dks, dvs)) from the kernels run by Triton's interpreter."""
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("ttt_diagonal_kernel"))


def _assert_bf16_close(mine, want):
    """Equal up to bf16 rounding (a unit in the last place, 2^-7 relative) of values computed
    alike in fp32, with a floor of 2^-8 of the largest, where the sums' order differs."""
    assert mine.dtype == want.dtype and mine.shape == want.shape
    floor = 2**-8 * float(want.float().abs().max())
    torch.testing.assert_close(mine.float(), want.float(), rtol=2**-7, atol=floor)


@pytest.mark.parametrize("name", [*SHAPES, "far-causal-lse"])
def test_merge_matches_torch(interpreted, name):
    (out, lse), _ = interpreted[name]
    want_out, want_lse = ttt_attention._merge_diagonal(*CASES[name][0])
    _assert_bf16_close(out, want_out)
    assert out.transpose(1, 2).is_contiguous(), "out is laid out [B, S, H, d] in memory"
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [*SHAPES, "far-causal-lse"])
def test_backward_matches_torch(interpreted, name):
    _, (dq, dks, dvs) = interpreted[name]
    want_dq, want_dks, want_dvs = ttt_attention._diagonal_backward(*CASES[name][1])
    _assert_bf16_close(dq, want_dq)
    assert len(dks) == len(dvs) == len(want_dks) == len(CASES[name][1][4])
    for mine, want in zip(dks + dvs, want_dks + want_dvs):
        _assert_bf16_close(mine, want)


def test_by_hand(interpreted):
    """_hand_case's values, all exact in bf16."""
    (out, lse), (dq, dks, dvs) = interpreted["hand"]
    assert out.float().flatten().tolist() == [0.5, 0.5]
    assert float(lse) == pytest.approx(math.log(2), abs=1e-6)
    assert dq.float().flatten().tolist() == [-0.25, 0.0]
    assert dks[0].float().flatten().tolist() == [0.0, -0.25]
    assert dvs[0].float().flatten().tolist() == [0.5, 0.0]


def test_head_dim_not_a_power_of_two_is_refused():
    q = torch.zeros(1, 1, 1, 24, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        merge_diagonal(q, q, torch.zeros(1, 1, 1), [q], [q], 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("keys", [1, 6, SLOTS + 3])
def test_compiled_kernels_match_torch_on_gpu(keys):
    """The kernels compiled for the GPU at the draft's head shape (32 heads over 8, d 128), on a
    length that is not a multiple of the block, against the eager torch functions there."""
    from trainer.ttt_diagonal_kernel import diagonal_backward

    merge, backward = _random_case(2, 32, 8, 1000, 128, keys, seed=keys)
    on_gpu = [[[x.cuda() for x in a] if isinstance(a, list) else (a.cuda() if torch.is_tensor(a) else a)
               for a in args] for args in (merge, backward)]
    out, lse = merge_diagonal(*on_gpu[0])
    want_out, want_lse = ttt_attention._merge_diagonal(*on_gpu[0])
    _assert_bf16_close(out, want_out)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-4)
    dq, dks, dvs = diagonal_backward(*on_gpu[1])
    want_dq, want_dks, want_dvs = ttt_attention._diagonal_backward(*on_gpu[1])
    for mine, want in zip([dq, *dks, *dvs], [want_dq, *want_dks, *want_dvs]):
        _assert_bf16_close(mine, want)
