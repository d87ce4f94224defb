"""The draft's memory-lean pieces compute what the plain torch composition computes.

trainer/head_loss.py (lm_head fused with the soft-label loss, chunked, recomputed in backward)
and trainer/lean_ops.py SwiGLUDown (keeps gate and up only) against the unfused expressions
written out here, on CPU: loss, accuracy and every gradient, in fp32 (tight) and bf16 (within
bf16 rounding). Also: what each keeps for backward, counted through autograd's saved-tensor hooks.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from trainer import head_loss  # noqa: E402
from trainer.head_loss import CountedRows, DraftHead  # noqa: E402
from trainer.lean_ops import SwiGLUDown  # noqa: E402


def reference_head_loss(normed, weight, probs, valid, offset):
    """The unfused Eagle3 step: full logits, fp32 log-softmax, masked soft cross-entropy sum."""
    seq = normed.shape[1]
    p = probs[:, offset : offset + seq]
    v = valid[:, offset : offset + seq]
    logp = torch.log_softmax((normed @ weight.T).float(), dim=-1)
    summed = (-(p * logp).sum(-1) * v).sum()
    agree = ((logp.argmax(-1) == p.argmax(-1)) & v).sum()
    return summed, agree


def _teacher(batch, seq, pad, vocab, generator):
    probs = torch.softmax(torch.randn(batch, seq + pad, vocab, generator=generator) * 3, dim=-1)
    probs[:, seq:] = 0  # the unroll's padding positions carry no target
    valid = torch.rand(batch, seq + pad, generator=generator) > 0.3
    valid[:, seq - 1 :] = False
    return probs, valid


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("offset", [1, 3])
def test_fused_head_matches_unfused(dtype, tol, offset, monkeypatch):
    # 5 rows per chunk: a 2 x 12 batch spans several chunks, one of them partial
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 5 * 4 * 40)
    g = torch.Generator().manual_seed(0)
    batch, seq, hidden, vocab, pad = 2, 12, 16, 40, 4
    probs, valid = _teacher(batch, seq, pad, vocab, g)
    head = DraftHead(hidden, vocab).to(dtype)
    normed = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_()
    weight = head.weight.detach().clone().requires_grad_()
    ref_normed = normed.detach().clone().requires_grad_()

    got, got_agree = head(normed, probs, CountedRows(valid), offset)
    want, want_agree = reference_head_loss(ref_normed, weight, probs, valid, offset)
    (got * 0.8).backward()
    (want * 0.8).backward()

    assert int(got_agree) == int(want_agree)
    assert torch.allclose(got, want, rtol=tol, atol=tol)
    scale = ref_normed.grad.abs().max()
    assert torch.allclose(normed.grad.float(), ref_normed.grad.float(), atol=tol * float(scale), rtol=tol)
    want_scale = weight.grad.abs().max()
    assert torch.allclose(head.weight.grad.float(), weight.grad.float(), atol=tol * float(want_scale), rtol=tol)
    # masked positions get no gradient at all
    masked = ~valid[:, offset : offset + seq]
    assert normed.grad[masked].abs().max() == 0


def test_fused_head_with_nothing_counted():
    head = DraftHead(8, 10)
    normed = torch.randn(1, 4, 8, requires_grad=True)
    probs = torch.zeros(1, 6, 10)
    valid = torch.zeros(1, 6, dtype=torch.bool)
    summed, agree = head(normed, probs, CountedRows(valid), 1)
    summed.backward()
    assert float(summed.detach()) == 0 and int(agree) == 0
    assert normed.grad.abs().max() == 0


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_fused_head_keeps_only_its_inputs():
    batch, seq, hidden, vocab, pad = 1, 64, 16, 1000, 3
    g = torch.Generator().manual_seed(1)
    probs, valid = _teacher(batch, seq, pad, vocab, g)
    valid[:] = True
    head = DraftHead(hidden, vocab)
    normed = torch.randn(batch, seq, hidden, requires_grad=True)
    # kept: the normed hidden, the weight, the teacher table (kept anyway) and two int64 row
    # indices; not the [S, Vd] fp32 log-softmax of the unfused step (64 x 1000 x 4 = 256000 B)
    kept = _saved_bytes(lambda: head(normed, probs, CountedRows(valid), 1))
    want = (seq * hidden * 4) + (vocab * hidden * 4) + probs.numel() * 4 + 2 * 8 * seq
    assert kept == want, (kept, want)
    unfused = _saved_bytes(lambda: reference_head_loss(normed, head.weight, probs, valid, 1))
    assert unfused >= seq * vocab * 4  # the log-softmax the fused head does not keep


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu_down_matches_unfused(dtype, tol):
    g = torch.Generator().manual_seed(2)
    tokens, inner, hidden = 24, 32, 8
    gate = torch.randn(2, tokens, inner, generator=g).to(dtype).requires_grad_()
    up = torch.randn(2, tokens, inner, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(hidden, inner, generator=g) / inner**0.5).to(dtype).requires_grad_()
    ref = [t.detach().clone().requires_grad_() for t in (gate, up, w)]
    upstream = torch.randn(2, tokens, hidden, generator=g).to(dtype)

    got = SwiGLUDown.apply(gate, up, w)
    want = F.linear(F.silu(ref[0]) * ref[1], ref[2])
    got.backward(upstream)
    want.backward(upstream)

    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    for mine, theirs in zip((gate, up, w), ref):
        scale = float(theirs.grad.abs().max())
        assert torch.allclose(mine.grad.float(), theirs.grad.float(), atol=tol * scale, rtol=tol)


def test_swiglu_down_keeps_gate_and_up_only():
    tokens, inner, hidden = 32, 64, 16
    gate = torch.randn(tokens, inner, requires_grad=True)
    up = torch.randn(tokens, inner, requires_grad=True)
    w = torch.randn(hidden, inner, requires_grad=True)
    # gate + up + the weight (fp32): 2 x 32 x 64 x 4 + 16 x 64 x 4
    assert _saved_bytes(lambda: SwiGLUDown.apply(gate, up, w)) == 2 * tokens * inner * 4 + hidden * inner * 4
    # the composition keeps gate, silu(gate), up and the product as well: 4 x 32 x 64 x 4 + weight
    plain = _saved_bytes(lambda: F.linear(F.silu(gate) * up, w))
    assert plain == 4 * tokens * inner * 4 + hidden * inner * 4


def test_lean_and_plain_drafts_train_alike():
    """A whole unroll, lean (fused head, SwiGLUDown) against plain (torch's composition), same
    weights: loss, accuracies and every trained gradient agree (fp32)."""
    from trainer.draft import DraftConfig, Eagle3Draft
    from trainer.loss import Teacher, unroll_loss

    cfg = DraftConfig(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=100, draft_vocab=40,
                      target_hidden=32, aux_layers=(0, 1, 2))
    torch.manual_seed(3)
    lean = Eagle3Draft(cfg, "eager", lean=True)
    plain = Eagle3Draft(cfg, "eager", lean=False)
    plain.load_state_dict(lean.state_dict())
    batch, seq, ttt = 2, 10, 3
    aux = torch.randn(batch, seq, 3 * cfg.target_hidden)
    ids = torch.randint(cfg.vocab, (batch, seq + ttt))
    probs, valid = _teacher(batch, seq, ttt, cfg.draft_vocab, torch.Generator().manual_seed(4))
    teacher = Teacher(probs, valid)
    results = []
    for draft in (lean, plain):
        loss, acc = unroll_loss(draft.unroll(aux, ids, ttt), draft.lm_head, teacher, lean=draft.lean)
        loss.backward()
        results.append((loss.detach(), acc, {n: p.grad for n, p in draft.named_parameters() if p.requires_grad}))
    (l1, a1, g1), (l2, a2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert a1 == a2
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), name
