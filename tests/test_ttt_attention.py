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
    ref = eager(q, keys, values, seq)
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


@pytest.mark.parametrize("checkpoint_layer", [False, True])
def test_a_draft_on_the_split_attention_trains_as_on_the_masked_one(checkpoint_layer):
    """The whole unroll (lean draft, fused norms, summed step gradients, the embedding projected
    once), same weights, attention split against eager: loss, accuracies and every trained
    gradient equal (fp32 on CPU), with checkpointed steps too (their forward runs twice)."""
    from trainer.draft import DraftConfig, Eagle3Draft
    from trainer.loss import Teacher

    cfg = DraftConfig(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=100, draft_vocab=40,
                      target_hidden=32, aux_layers=(0, 1, 2))
    torch.manual_seed(7)
    split = Eagle3Draft(cfg, "split", checkpoint_layer=checkpoint_layer)
    masked = Eagle3Draft(cfg, "eager", checkpoint_layer=checkpoint_layer)
    masked.load_state_dict(split.state_dict())
    batch, seq, ttt = 2, 10, 4
    g = torch.Generator().manual_seed(8)
    aux = torch.randn(batch, seq, 3 * cfg.target_hidden, generator=g)
    ids = torch.randint(cfg.vocab, (batch, seq + ttt), generator=g)
    logits = torch.randn(batch, seq + ttt, cfg.draft_vocab, generator=g) * 3
    valid = torch.rand(batch, seq + ttt, generator=g) > 0.3
    valid[:, seq - 1:] = False
    results = []
    for draft in (split, masked):
        loss, acc = draft(aux, ids, ttt, Teacher(logits, valid, True))
        loss.backward()
        results.append((loss.detach(), acc, {n: p.grad for n, p in draft.named_parameters() if p.requires_grad}))
    (l1, a1, g1), (l2, a2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert torch.equal(a1, a2)
    assert set(g1) == set(g2) and all(grad is not None for grad in g1.values())
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)
