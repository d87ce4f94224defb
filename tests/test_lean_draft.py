"""The draft's memory-lean pieces compute what the plain torch composition computes.

trainer/head_loss.py (final norm and lm_head fused with the soft-label loss, chunked,
recomputed in backward), trainer/lean_ops.py SwiGLUDown (keeps gate and up only) and
trainer/norm_project.py (RMSNorm fused with the projections reading it; o_proj over the
attention kernel's own output) against the unfused expressions
written out here, on CPU: loss, accuracy and every gradient, in fp32 (tight) and bf16 (within
bf16 rounding). Also: what each keeps for backward, counted through autograd's saved-tensor hooks.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from fitplan.estimator import draft_terms  # noqa: E402
from trainer import head_loss  # noqa: E402
from trainer.head_loss import CountedRows, DraftHead  # noqa: E402
from trainer.lean_ops import SwiGLUDown  # noqa: E402
from trainer.norm_project import heads_project, norm_project  # noqa: E402
from trainer.loss import Teacher  # noqa: E402

EPS = 1e-6


def rms_norm(x, weight, eps=EPS):
    """Llama's RMSNorm written out: fp32 statistics, the weight applied in the input's dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _Norm(torch.nn.Module):
    def __init__(self, width, dtype, generator):
        super().__init__()
        self.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(width, generator=generator)).to(dtype))
        self.eps = EPS


def reference_head_loss(hidden, norm_weight, weight, teacher_logits, valid, offset):
    """The unfused Eagle3 step: final norm, full logits, fp32 log-softmax against the softmax of
    the teacher's logits, masked soft cross-entropy sum."""
    seq = hidden.shape[1]
    p = torch.softmax(teacher_logits[:, offset : offset + seq].float(), dim=-1)
    v = valid[:, offset : offset + seq]
    logp = torch.log_softmax((rms_norm(hidden, norm_weight) @ weight.T).float(), dim=-1)
    summed = (-(p * logp).sum(-1) * v).sum()
    agree = ((logp.argmax(-1) == p.argmax(-1)) & v).sum()
    return summed, agree


def _teacher(batch, seq, pad, vocab, generator, every_position: bool = False):
    """Teacher logits and which positions count: about 70%, none of the last and the padding;
    or, `every_position`, all of them (every chunk then reads and writes its rows as slices)."""
    logits = torch.randn(batch, seq + pad, vocab, generator=generator) * 3
    logits[:, seq:] = 0  # the unroll's padding positions carry no target
    valid = torch.rand(batch, seq + pad, generator=generator) > 0.3
    valid[:, seq - 1 :] = False
    return logits, torch.ones_like(valid) if every_position else valid


def _head_case(dtype, seed: int, steps: int, every_position: bool = False):
    """A 2 x 12 batch over a 40-word vocab: (teacher, valid, head, norm, the steps' hiddens, and
    unfused copies of the head weight, the norm weight and the hiddens)."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, hidden, vocab, pad = 2, 12, 16, 40, 4
    logits, valid = _teacher(batch, seq, pad, vocab, g, every_position)
    head = DraftHead(hidden, vocab).to(dtype)
    norm = _Norm(hidden, dtype, g)
    xs = [torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_() for _ in range(steps)]
    copies = (head.weight.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_(),
              [x.detach().clone().requires_grad_() for x in xs])
    return logits.to(dtype), valid, head, norm, xs, copies


def _assert_grads_close(pairs, tol: float) -> None:
    for mine, theirs in pairs:
        scale = float(theirs.grad.abs().max())
        assert torch.allclose(mine.grad.float(), theirs.grad.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("vocab", [40, 32000, 128256, 151936, 201088, 600_000])
def test_estimator_chunks_the_head_as_the_trainer(vocab, grad_in_forward):
    """fitplan's head_chunk_rows is trainer/head_loss.py chunk_rows for the job's draft vocab
    (at S 16384, more positions than a chunk). By hand at a 32k vocab: in forward 512 MiB / (2 B
    x 32000) = 8388 rows, 8192 as a multiple of 256; in backward 256 MiB / (4 B x 32000) = 2097."""
    from dataclasses import replace

    from fitplan.config import RunSpec
    from fitplan.layout import resolve

    job = resolve(RunSpec(model="llama-3.1-8b", gpus="1xH200", seq=16384, head_grad_in_forward=grad_in_forward))
    job = replace(job, draft=replace(job.draft, draft_vocab=vocab))
    assert draft_terms.head_chunk_rows(job) == min(head_loss.chunk_rows(vocab, grad_in_forward), 16384)
    if vocab == 32000:
        assert head_loss.chunk_rows(vocab, grad_in_forward) == (8192 if grad_in_forward else 2097)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("every_position", [False, True])
def test_fused_head_matches_unfused(dtype, tol, offset, every_position, monkeypatch):
    # 5 rows per chunk: a 2 x 12 batch spans several chunks, one of them partial
    monkeypatch.setattr(draft_terms, "HEAD_CHUNK_BYTES", 5 * 4 * 40)
    teacher, valid, head, norm, (x,), (weight, norm_weight, (ref_x,)) = _head_case(dtype, 0, 1, every_position)
    seq = x.shape[1]

    got, got_agree = head(x, norm, Teacher(teacher, valid, True), CountedRows(valid), offset)
    want, want_agree = reference_head_loss(ref_x, norm_weight, weight, teacher, valid, offset)
    (got * 0.8).backward()
    (want * 0.8).backward()

    assert int(got_agree) == int(want_agree)
    assert torch.allclose(got, want, rtol=tol, atol=tol)
    _assert_grads_close(((x, ref_x), (head.weight, weight), (norm.weight, norm_weight)), tol)
    # masked positions get no gradient at all
    masked = ~valid[:, offset : offset + seq]
    assert not x.grad[masked].any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("every_position", [False, True])
def test_head_gradients_made_in_forward_match_unfused(dtype, tol, every_position, monkeypatch):
    """Two steps of an unroll whose head makes its gradients in forward (RunSpec
    head_grad_in_forward), each told the weight its loss gets (scale), the total then divided as
    for an accumulation of 2: loss, agreements and every gradient as the unfused steps; with
    every position counted, too (the chunks' rows as slices, the hidden's gradient unfilled)."""
    from trainer.step_grads import StepGrads

    # 5 rows of bf16 logits per chunk: several chunks, one partial
    monkeypatch.setattr(draft_terms, "HEAD_FORWARD_GRAD_CHUNK_BYTES", 5 * 2 * 40)
    teacher, valid, head, norm, xs, (weight, norm_weight, ref_xs) = _head_case(dtype, 2, 2, every_position)
    scales = [1 / 17, 0.8 / 13]  # a step's decay over its counted positions, as unroll_loss gives
    grads, rows = StepGrads(2), CountedRows(valid)

    taught = Teacher(teacher, valid, True)
    got = [head(x, norm, taught, rows, k + 1, grads, scales[k]) for k, x in enumerate(xs)]
    want = [reference_head_loss(x, norm_weight, weight, teacher, valid, k + 1) for k, x in enumerate(ref_xs)]
    (sum(s * loss for s, (loss, _) in zip(scales, got)) / 2).backward()
    (sum(s * loss for s, (loss, _) in zip(scales, want)) / 2).backward()

    for (loss, agree), (ref_loss, ref_agree) in zip(got, want):
        assert int(agree) == int(ref_agree)
        assert torch.allclose(loss, ref_loss, rtol=tol, atol=tol)
    _assert_grads_close([*zip(xs, ref_xs), (head.weight, weight), (norm.weight, norm_weight)], tol)


def test_head_gradients_in_forward_need_the_summed_buffers():
    head, norm = DraftHead(8, 10), _Norm(8, torch.float32, torch.Generator().manual_seed(0))
    valid = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="summed gradients"):
        head(torch.randn(1, 4, 8, requires_grad=True), norm, Teacher(torch.zeros(1, 6, 10), valid, True),
             CountedRows(valid), 1, scale=1.0)


def test_head_gradients_in_forward_with_nothing_counted():
    from trainer.step_grads import StepGrads

    head = DraftHead(8, 10)
    norm = _Norm(8, torch.float32, torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 8, requires_grad=True)
    valid = torch.zeros(1, 6, dtype=torch.bool)
    summed, agree = head(x, norm, Teacher(torch.zeros(1, 6, 10), valid, True), CountedRows(valid), 1, StepGrads(1), 0.8)
    (0.8 * summed).backward()
    assert float(summed.detach()) == 0 and int(agree) == 0
    assert x.grad.abs().max() == 0 and norm.weight.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def test_an_unroll_without_autograd_makes_no_gradient():
    """The loss of an unroll run under no_grad (looked at, not trained on) is the trained one's,
    and the head makes no gradient for it: no head weight's sum is started."""
    from trainer.loss import unroll_loss
    from trainer.step_grads import StepGrads

    draft, (aux, ids, ttt, teacher) = _fused_draft_and_inputs(torch.float32)
    assert draft.head_grad_in_forward
    trained, _ = unroll_loss(draft.unroll(aux, ids, ttt, StepGrads(ttt)), draft, teacher, StepGrads(ttt))
    grads = StepGrads(ttt)
    with torch.no_grad():
        looked, _ = unroll_loss(draft.unroll(aux, ids, ttt, grads), draft, teacher, grads)
    assert torch.allclose(looked, trained.detach(), rtol=1e-6)
    assert grads._totals == {}


def test_head_gradients_in_forward_keep_neither_hidden_nor_teacher():
    """Nothing goes through autograd's saved tensors (the hidden's gradient [N, h] is the one
    thing the step holds), so the teacher is free to go once scored: collected before backward."""
    import gc
    import weakref

    from trainer.step_grads import StepGrads

    g = torch.Generator().manual_seed(1)
    teacher, valid = _teacher(1, 16, 3, 50, g)
    head, norm = DraftHead(8, 50), _Norm(8, torch.float32, g)
    x = torch.randn(1, 16, 8, requires_grad=True)
    table = teacher.clone()
    kept = _saved_bytes(lambda: head(x, norm, Teacher(table, valid, True), CountedRows(valid), 1, StepGrads(1), 0.5))
    assert kept == 0
    summed, _ = head(x, norm, Teacher(teacher, valid, True), CountedRows(valid), 1, StepGrads(1), 0.5)
    gone = weakref.ref(teacher)
    del teacher
    gc.collect()
    assert gone() is None
    (0.5 * summed).backward()
    assert x.grad.abs().max() > 0


def test_fused_head_with_nothing_counted():
    head = DraftHead(8, 10)
    norm = _Norm(8, torch.float32, torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 8, requires_grad=True)
    teacher = torch.zeros(1, 6, 10)
    valid = torch.zeros(1, 6, dtype=torch.bool)
    summed, agree = head(x, norm, Teacher(teacher, valid, True), CountedRows(valid), 1)
    summed.backward()
    assert float(summed.detach()) == 0 and int(agree) == 0
    assert x.grad.abs().max() == 0 and norm.weight.grad.abs().max() == 0


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
    teacher, valid = _teacher(batch, seq, pad, vocab, g)
    valid[:] = True
    head = DraftHead(hidden, vocab)
    norm = _Norm(hidden, torch.float32, g)
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    # kept: the pre-norm hidden, the norm's and the head's weights, the teacher table (kept
    # anyway) with its rows' fp32 log-sum-exp and int32 argmax, and two int64 row indices; not
    # the final norm's output, nor the [S, Vd] fp32 log-softmax of the unfused step
    # (64 x 1000 x 4 = 256000 B)
    kept = _saved_bytes(lambda: head(x, norm, Teacher(teacher, valid, True), CountedRows(valid), 1))
    want = (seq * hidden * 4) + hidden * 4 + (vocab * hidden * 4) + teacher.numel() * 4 + 2 * 4 * (seq + pad) + 2 * 8 * seq
    assert kept == want, (kept, want)
    unfused = _saved_bytes(lambda: reference_head_loss(x, norm.weight, head.weight, teacher, valid, 1))
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


@pytest.mark.parametrize("recompute_norms,checkpoint_layer,recompute_mlp",
                         [(True, False, False), (False, False, False), (True, True, False), (True, False, True),
                          (True, True, True)])
def test_lean_and_plain_drafts_train_alike(recompute_norms, checkpoint_layer, recompute_mlp):
    """A whole unroll as the step runs it (Eagle3Draft.forward: with fused norms each weight's
    gradient summed over the steps, trainer/step_grads.py), lean (fused head, SwiGLUDown) against
    plain (torch's composition), same weights: loss, accuracies and every trained gradient agree
    (fp32); with checkpointed steps too, whose forward runs twice and backward once."""
    from trainer.draft import DraftConfig, Eagle3Draft

    cfg = DraftConfig(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=100, draft_vocab=40,
                      target_hidden=32, aux_layers=(0, 1, 2))
    torch.manual_seed(3)
    lean = Eagle3Draft(cfg, "eager", lean=True, recompute_norms=recompute_norms, checkpoint_layer=checkpoint_layer,
                       recompute_mlp=recompute_mlp)
    assert lean.sum_step_grads == recompute_norms
    assert lean.midlayer.recompute_mlp == recompute_mlp
    plain = Eagle3Draft(cfg, "eager", lean=False)
    plain.load_state_dict(lean.state_dict())
    batch, seq, ttt = 2, 10, 3
    aux = torch.randn(batch, seq, 3 * cfg.target_hidden)
    ids = torch.randint(cfg.vocab, (batch, seq + ttt))
    logits, valid = _teacher(batch, seq, ttt, cfg.draft_vocab, torch.Generator().manual_seed(4))
    probs = torch.softmax(logits, dim=-1)
    probs[:, seq:] = 0
    results = []
    for draft in (lean, plain):
        teacher = Teacher(logits, valid, True) if draft.fused_norms else Teacher(probs, valid, False)
        loss, acc = draft(aux, ids, ttt, teacher)
        loss.backward()
        results.append((loss.detach(), acc, {n: p.grad for n, p in draft.named_parameters() if p.requires_grad}))
    (l1, a1, g1), (l2, a2, g2) = results
    assert set(g1) == set(g2) and all(g is not None for g in g1.values())
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert torch.equal(a1, a2)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("inputs", [1, 2])
def test_norm_project_matches_unfused(dtype, tol, inputs):
    """cat(norm(x_i)) projected by two weights: outputs and every gradient as the composition."""
    g = torch.Generator().manual_seed(5)
    tokens, width, outs = 12, 16, (24, 8)
    xs = [torch.randn(2, tokens, width, generator=g).to(dtype).requires_grad_() for _ in range(inputs)]
    norms = [_Norm(width, dtype, g).weight for _ in range(inputs)]
    projs = [(torch.randn(n, inputs * width, generator=g) / width**0.5).to(dtype).requires_grad_() for n in outs]
    mine = xs + norms + projs
    ref = [t.detach().clone().requires_grad_() for t in mine]
    rx, rn, rp = ref[:inputs], ref[inputs : 2 * inputs], ref[2 * inputs :]
    upstream = [torch.randn(2, tokens, n, generator=g).to(dtype) for n in outs]

    got = norm_project(tuple(xs), tuple(norms), EPS, tuple(projs))
    joined = torch.cat([rms_norm(x, w) for x, w in zip(rx, rn)], dim=-1)
    want = [joined @ w.T for w in rp]
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, upstream)

    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    for a, b in zip(mine, ref):
        scale = float(b.grad.abs().max())
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol * scale, rtol=tol)


def test_norm_project_keeps_the_norm_inputs_only():
    tokens, width = 32, 16
    xs = tuple(torch.randn(tokens, width, requires_grad=True) for _ in range(2))
    norms = tuple(torch.ones(width, requires_grad=True) for _ in range(2))
    projs = (torch.randn(24, 2 * width, requires_grad=True),)
    # the two inputs (32 x 16 x 4 each), their fp32 rstds (32 x 4 each), the weights
    want = 2 * tokens * width * 4 + 2 * tokens * 4 + 2 * width * 4 + 24 * 2 * width * 4
    assert _saved_bytes(lambda: norm_project(xs, norms, EPS, projs)) == want
    # the composition keeps the [32, 32] joined normed input beside: 32 x 32 x 4 more
    composed = _saved_bytes(lambda: torch.cat([rms_norm(x, w) for x, w in zip(xs, norms)], -1) @ projs[0].T)
    assert composed > want


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_heads_project_matches_unfused(dtype, tol):
    g = torch.Generator().manual_seed(6)
    b, heads, s, d, hidden = 2, 4, 10, 8, 12
    out = torch.randn(b, heads, s, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(hidden, heads * d, generator=g) / d).to(dtype).requires_grad_()
    ref_out, ref_w = (t.detach().clone().requires_grad_() for t in (out, w))
    upstream = torch.randn(b, s, hidden, generator=g).to(dtype)

    got = heads_project(out, w)
    want = ref_out.transpose(1, 2).reshape(b, s, heads * d) @ ref_w.T
    got.backward(upstream)
    want.backward(upstream)

    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    for a, r in ((out, ref_out), (w, ref_w)):
        scale = float(r.grad.abs().max())
        assert torch.allclose(a.grad.float(), r.grad.float(), atol=tol * scale, rtol=tol)
    # kept: the kernel's output itself and the weight, not the [B, S, H*d] copy
    kept = _saved_bytes(lambda: heads_project(out.detach().requires_grad_(), w))
    assert kept == out.numel() * out.element_size() + w.numel() * w.element_size()


def _fused_draft_and_inputs(dtype):
    from trainer.draft import DraftConfig, Eagle3Draft

    cfg = DraftConfig(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=100, draft_vocab=40,
                      target_hidden=32, aux_layers=(0, 1, 2))
    torch.manual_seed(5)
    draft = Eagle3Draft(cfg, "eager").to(dtype)
    batch, seq, ttt = 2, 10, 4
    aux = torch.randn(batch, seq, 3 * cfg.target_hidden, dtype=dtype)
    ids = torch.randint(cfg.vocab, (batch, seq + ttt))
    logits, valid = _teacher(batch, seq, ttt, cfg.draft_vocab, torch.Generator().manual_seed(6))
    return draft, (aux, ids, ttt, Teacher(logits.to(dtype), valid, True))


def _grads_of(draft, inputs, summed: bool) -> dict:
    from trainer.loss import unroll_loss
    from trainer.step_grads import StepGrads

    draft.zero_grad(set_to_none=True)
    aux, ids, ttt, teacher = inputs
    grads = StepGrads(ttt) if summed else None
    loss, _ = unroll_loss(draft.unroll(aux, ids, ttt, grads), draft, teacher, grads)
    loss.backward()
    return {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_summed_step_grads_equal_autograds_sum(dtype, tol):
    """Every trained weight's gradient summed over the steps in one buffer equals autograd's sum
    of one gradient per step (bf16: within its rounding, the additions being in another order)."""
    draft, inputs = _fused_draft_and_inputs(dtype)
    summed, per_step = _grads_of(draft, inputs, True), _grads_of(draft, inputs, False)
    assert set(summed) == set(per_step)
    for name, g in per_step.items():
        err = (summed[name].float() - g.float()).norm() / g.float().norm()
        assert err < tol, (name, float(err))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_head_gradients_in_forward_equal_made_in_backward(dtype, tol):
    """The whole unroll, the head's gradients made in forward against made again in backward
    (RunSpec head_grad_in_forward), the loss divided as for an accumulation of 3: every trained
    gradient equal (bf16: within its rounding, the logits' gradients summed in another order)."""
    draft, inputs = _fused_draft_and_inputs(dtype)

    def grads_with(in_forward: bool) -> dict:
        from trainer.loss import unroll_loss
        from trainer.step_grads import StepGrads

        draft.head_grad_in_forward = in_forward
        draft.zero_grad(set_to_none=True)
        aux, ids, ttt, teacher = inputs
        grads = StepGrads(ttt)
        loss, _ = unroll_loss(draft.unroll(aux, ids, ttt, grads), draft, teacher, grads)
        (loss / 3).backward()
        return {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}

    forward, backward = grads_with(True), grads_with(False)
    assert set(forward) == set(backward)
    for name, g in backward.items():
        err = (forward[name].float() - g.float()).norm() / g.float().norm()
        assert err < tol, (name, float(err))


def test_summed_step_grads_make_each_weight_gradient_once():
    """Forward and backward of a 4-step unroll: new tensors shaped like the lm_head weight [Vd, h]
    (none other has that shape here; in-place ops and views do not count): at least one per step's
    backward with a gradient per step, one in all summed (made by the first step's head, which
    makes its gradients in forward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    draft, inputs = _fused_draft_and_inputs(torch.float32)
    shape = tuple(draft.lm_head.weight.shape)

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            new = not func.is_view and not func._schema.name.endswith("_") and "out" not in (kwargs or {})
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if new and isinstance(t, torch.Tensor) and tuple(t.shape) == shape:
                    self.count += 1
            return out

    made = {}
    for summed in (True, False):
        from trainer.loss import unroll_loss
        from trainer.step_grads import StepGrads

        draft.zero_grad(set_to_none=True)
        aux, ids, ttt, teacher = inputs
        grads = StepGrads(ttt) if summed else None
        with Made() as mode:
            loss, _ = unroll_loss(draft.unroll(aux, ids, ttt, grads), draft, teacher, grads)
            loss.backward()
        made[summed] = mode.count
    assert made[True] == 1 and made[False] >= ttt, made


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("summed", [False, True])
def test_norm_swiglu_down_matches_unfused(dtype, tol, summed):
    """norm + gate/up + SwiGLU + down made again in backward: output and every gradient as
    torch's composition, with each weight's gradient returned or summed over two calls."""
    from trainer.recompute_mlp import norm_swiglu_down
    from trainer.step_grads import StepGrads

    g = torch.Generator().manual_seed(6)
    tokens, width, inner = 12, 16, 40
    x = torch.randn(2, tokens, width, generator=g).to(dtype).requires_grad_()
    norm = _Norm(width, dtype, g).weight
    w_gate, w_up = ((torch.randn(inner, width, generator=g) / width**0.5).to(dtype).requires_grad_() for _ in "gu")
    w_down = (torch.randn(width, inner, generator=g) / inner**0.5).to(dtype).requires_grad_()
    mine = [x, norm, w_gate, w_up, w_down]
    ref = [t.detach().clone().requires_grad_() for t in mine]
    upstream = torch.randn(2, tokens, width, generator=g).to(dtype)
    calls = 2 if summed else 1
    grads = StepGrads(calls) if summed else None

    for _ in range(calls):
        norm_swiglu_down(x, norm, EPS, w_gate, w_up, w_down, grads).backward(upstream)
        rx, rn, rg, ru, rd = ref
        normed = rms_norm(rx, rn)
        want = F.linear(F.silu(F.linear(normed, rg)) * F.linear(normed, ru), rd)
        want.backward(upstream)
    got = norm_swiglu_down(x.detach(), norm.detach(), EPS, w_gate.detach(), w_up.detach(), w_down.detach())
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    for name, a, b in zip(("x", "norm", "gate", "up", "down"), mine, ref):
        scale = float(b.grad.abs().max())
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol * scale, rtol=tol), name


def test_norm_swiglu_down_keeps_its_input_only():
    """What the function saves: the input x and its fp32 rstd per row, and the four weights
    (which the module holds anyway); SwiGLUDown after a norm-projection keeps gate and up too."""
    from trainer.recompute_mlp import norm_swiglu_down

    tokens, width, inner = 32, 16, 48
    x = torch.randn(tokens, width, requires_grad=True)
    norm = torch.ones(width, requires_grad=True)
    w_gate, w_up = (torch.randn(inner, width, requires_grad=True) for _ in "gu")
    w_down = torch.randn(width, inner, requires_grad=True)
    weights = (width + 3 * inner * width) * 4
    # x 32 x 16 x 4, rstd 32 x 4, the weights
    want = tokens * width * 4 + tokens * 4 + weights
    assert _saved_bytes(lambda: norm_swiglu_down(x, norm, EPS, w_gate, w_up, w_down)) == want
    # keeping gate and up instead: 2 x 32 x 48 x 4 bytes more
    kept = _saved_bytes(lambda: SwiGLUDown.apply(*norm_project((x,), (norm,), EPS, (w_gate, w_up)), w_down))
    assert kept == want + 2 * tokens * inner * 4


def test_counted_rows_by_hand():
    """valid [2, 6]: row 0 counts teacher positions 0, 2, 3; row 1 positions 1, 4, 5. The step
    scored at offset 1 over S = 4 positions sees teacher positions 1..4: row 0 has 2 and 3 (its
    positions 1 and 2 in the step), row 1 has 1 and 4 (0 and 3); 4 in all. Hidden rows are b * S
    + t, teacher rows b * 6 + position."""
    from trainer.head_loss import CountedRows

    valid = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    rows = CountedRows(valid)
    assert rows.count(1, 4) == 4 and rows.count(0, 6) == 6 and rows.count(5, 1) == 1
    x_rows, p_rows, spans = rows.for_step(1, 4, chunk=3)
    assert x_rows.tolist() == [1, 2, 4 + 0, 4 + 3] and p_rows.tolist() == [2, 3, 6 + 1, 6 + 4]
    assert x_rows.dtype == p_rows.dtype == torch.int64
    assert spans == (None, slice(7, 8))  # chunk rows 1, 2, 4 have a gap; the last chunk is row 7 alone
    assert rows.for_step(1, 4, chunk=2)[2] == (slice(1, 3), None)
    full = CountedRows(torch.ones(2, 6, dtype=torch.bool))
    assert full.for_step(1, 4, chunk=3)[2] == (slice(0, 3), slice(3, 6), slice(6, 8))  # every row counted
    empty = CountedRows(torch.zeros(2, 6, dtype=torch.bool))
    assert empty.count(1, 4) == 0 and empty.for_step(1, 4, chunk=3)[0].tolist() == []
    assert empty.for_step(1, 4, chunk=3)[2] == ()


def _checkpointed_draft_and_inputs(device: str, attention: str):
    """A lean draft whose TTT steps are checkpointed (RunSpec ac), in bf16 on `device`."""
    from trainer.draft import DraftConfig, Eagle3Draft

    cfg = DraftConfig(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100, draft_vocab=40,
                      target_hidden=64, aux_layers=(0, 1, 2))
    torch.manual_seed(7)
    draft = Eagle3Draft(cfg, attention, checkpoint_layer=True).to(device, torch.bfloat16)
    batch, seq, ttt = 1, 64, 3
    aux = torch.randn(batch, seq, 3 * cfg.target_hidden, device=device, dtype=torch.bfloat16)
    ids = torch.randint(cfg.vocab, (batch, seq + ttt), device=device)
    logits, valid = _teacher(batch, seq, ttt, cfg.draft_vocab, torch.Generator().manual_seed(8))
    return draft, (aux, ids, ttt, Teacher(logits.to(device, torch.bfloat16), valid.to(device), True))


def test_checkpointed_steps_are_recomputed_whole(monkeypatch):
    """Each TTT step's checkpoint is taken with early stopping off: stopping early raises out of a
    saved-tensor hook inside the fused functions' apply, which torch 2.11 on an H200 turned into
    a SystemError in backward (docs/data/ac_recompute_early_stop_h200.txt)."""
    import torch.utils.checkpoint as torch_checkpoint

    from trainer import draft as draft_module

    seen = []
    real = draft_module.checkpoint

    def recording(*args, **kwargs):
        seen.append(torch_checkpoint._enable_checkpoint_early_stop)
        return real(*args, **kwargs)

    monkeypatch.setattr(draft_module, "checkpoint", recording)
    draft, inputs = _checkpointed_draft_and_inputs("cpu", "eager")
    loss, _ = draft(*inputs)
    loss.backward()
    assert seen == [False] * inputs[2]
    assert all(p.grad is not None for p in draft.trainable())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpointed_lean_draft_trains_on_cuda():
    """The run that failed on an H200 before the steps were recomputed whole: split attention,
    the fused functions and their Triton kernels inside checkpointed steps, backward through
    all of them."""
    draft, inputs = _checkpointed_draft_and_inputs("cuda", "split")
    loss, _ = draft(*inputs)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in draft.trainable())
