"""The split TTT attention equals the masked attention over the concatenated keys (CPU)."""

import pytest
import torch

from trainer.draft import eager
from trainer.ttt_attention import ttt_attention


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_split_attention_equals_masked_attention(steps):
    torch.manual_seed(steps)
    b, heads, kv_heads, seq, d = 2, 8, 2, 24, 16
    q = torch.randn(b, seq, heads, d).transpose(1, 2).requires_grad_()
    keys = [torch.randn(b, kv_heads, seq, d, requires_grad=True) for _ in range(steps)]
    values = [torch.randn(b, kv_heads, seq, d, requires_grad=True) for _ in range(steps)]
    out = ttt_attention(q, keys, values)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, *keys, *values], upstream)
    ref = eager(q, torch.cat(keys, 2), torch.cat(values, 2), seq)
    ref_grads = torch.autograd.grad(ref, [q, *keys, *values], upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_wrong_diagonal_changes_the_output():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 16, 8)
    keys = [torch.randn(1, 2, 16, 8) for _ in range(2)]
    values = [torch.randn(1, 2, 16, 8) for _ in range(2)]
    shifted = [keys[0], keys[1].roll(1, dims=2)]
    assert not torch.allclose(ttt_attention(q, keys, values), ttt_attention(q, shifted, values))
