"""The embedding's half of the draft's q/k/v projected once per unroll (trainer/embedding_projection.py)
computes what every TTT step projecting its own embedding computes.

The same draft, same weights and inputs, runs the unroll with the shared projection on and off
(Eagle3Draft.project_embedding_once): loss and every trained gradient agree, fp32 within 1e-5
relative and bf16 within 2e-2, over 1, 3 and 7 steps, checkpointed or not, the head's gradients
made in forward or in backward, one micro-step or two accumulated. The input tokens are all
distinct, so a projection read one row off changes the loss (checked by shifting it on purpose).
Also: no step keeps its embedding for backward, and P and G have the shapes the estimate counts.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainer import embedding_projection  # noqa: E402
from trainer.draft import DraftConfig, Eagle3Draft  # noqa: E402
from trainer.loss import Teacher, unroll_loss  # noqa: E402
from trainer.step_grads import StepGrads  # noqa: E402

from test_lean_draft import _saved_bytes, _teacher  # noqa: E402  (pytest puts tests/ on the path)

# h 32, 4 heads and 2 KV heads of 8: q/k/v together 4 x 8 + 2 x 2 x 8 = 64 output columns
CFG = DraftConfig(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=200, draft_vocab=40,
                  target_hidden=32, aux_layers=(0, 1, 2))
BATCH, SEQ = 2, 10


def _draft(dtype, ttt: int, **knobs) -> Eagle3Draft:
    torch.manual_seed(5)
    return Eagle3Draft(CFG, "eager", **knobs).to(dtype)


def _micro_batch(dtype, ttt: int, seed: int):
    """aux, input ids [B, S + ttt] all distinct (so a shifted read sees other tokens), teacher."""
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(BATCH, SEQ, 3 * CFG.target_hidden, generator=g).to(dtype)
    ids = torch.randperm(CFG.vocab, generator=g)[: BATCH * (SEQ + ttt)].view(BATCH, SEQ + ttt)
    logits, valid = _teacher(BATCH, SEQ, ttt, CFG.draft_vocab, g)
    return aux, ids, Teacher(logits.to(dtype), valid, True)


def _trained(draft: Eagle3Draft, ttt: int, once: bool, micro_steps: int, dtype) -> tuple[list[float], dict]:
    """Losses of `micro_steps` accumulated micro-steps and the trained gradients they leave."""
    draft.project_embedding_once = once
    draft.zero_grad(set_to_none=True)
    losses = []
    for micro in range(micro_steps):
        aux, ids, teacher = _micro_batch(dtype, ttt, seed=10 + micro)
        loss, _ = draft(aux, ids, ttt, teacher)
        (loss / micro_steps).backward()
        losses.append(float(loss.detach()))
    return losses, {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ttt", [1, 3, 7])
@pytest.mark.parametrize("checkpoint_layer", [False, True])
@pytest.mark.parametrize("head_grad_in_forward", [True, False])
@pytest.mark.parametrize("micro_steps", [1, 2])
def test_projected_once_equals_projected_per_step(dtype, tol, ttt, checkpoint_layer, head_grad_in_forward,
                                                  micro_steps):
    draft = _draft(dtype, ttt, checkpoint_layer=checkpoint_layer, head_grad_in_forward=head_grad_in_forward)
    assert draft.sum_step_grads
    once_losses, once = _trained(draft, ttt, True, micro_steps, dtype)
    per_step_losses, per_step = _trained(draft, ttt, False, micro_steps, dtype)
    assert set(once) == set(per_step) and all(g is not None for g in once.values())
    for a, b in zip(once_losses, per_step_losses):
        assert abs(a - b) <= tol * abs(b), (a, b)
    for name, g in per_step.items():
        assert _relative(once[name], g) <= tol, (name, _relative(once[name], g))


class _ReadOneRowOff(embedding_projection.EmbeddingProjection):
    """The projection of the tokens one position before the right ones."""

    def __init__(self, table, ids, *rest):
        super().__init__(table, ids.roll(1, dims=1), *rest)


def test_a_projection_one_row_off_changes_the_loss(monkeypatch):
    """What the equality above rests on: with distinct tokens the rows read matter (a loss
    change far beyond fp32's 1e-5)."""
    from trainer import draft as draft_module

    ttt = 3
    draft = _draft(torch.float32, ttt)
    aux, ids, teacher = _micro_batch(torch.float32, ttt, seed=10)
    with torch.no_grad():
        right, _ = draft(aux, ids, ttt, teacher)
        monkeypatch.setattr(draft_module, "EmbeddingProjection", _ReadOneRowOff)
        off, _ = draft(aux, ids, ttt, teacher)
    assert abs(float(off) - float(right)) > 1e-3 * abs(float(right))


def test_no_step_keeps_its_embedding():
    """The unroll's saved tensors, fp32, B 2 x S 10, h 32, 3 steps: per step the per-step path
    keeps the embedding [2, 10, 32] (2560 B) and its fp32 rstd [2, 10, 1] (80 B) more:
    3 x 2640 = 7920 B (the weights and every other saved tensor the same storages)."""
    ttt = 3
    draft = _draft(torch.float32, ttt)
    aux, ids, teacher = _micro_batch(torch.float32, ttt, seed=10)

    def kept(once: bool) -> int:
        draft.project_embedding_once = once
        grads = StepGrads(ttt)
        return _saved_bytes(lambda: unroll_loss(draft.unroll(aux, ids, ttt, grads), draft, teacher, grads))

    assert kept(False) - kept(True) == 3 * (2 * 10 * 32 * 4 + 2 * 10 * 4) == 7920


def test_product_and_gradient_buffer_shapes_and_lifetimes(monkeypatch):
    """P is [B, S + L - 1, out] per projection (q, k, v) in the compute dtype from before the first
    step to the last backward call; G the same in fp32 from the first backward call to the last:
    bf16, B 2, S 10, 3 steps, q 32 and k, v 16 columns each: P [2, 12, 32] + 2 x [2, 12, 16] bf16
    (1536 + 2 x 768 = 3072 B), G the same shapes in fp32 (6144 B)."""
    from trainer import draft as draft_module

    made = []

    class Seen(embedding_projection.EmbeddingProjection):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(draft_module, "EmbeddingProjection", Seen)
    ttt = 3
    draft = _draft(torch.bfloat16, ttt)
    aux, ids, teacher = _micro_batch(torch.bfloat16, ttt, seed=10)
    loss, _ = draft(aux, ids, ttt, teacher)
    (shared,) = made
    assert [tuple(p.shape) for p in shared.products] == [(2, 12, 32), (2, 12, 16), (2, 12, 16)]
    assert {p.dtype for p in shared.products} == {torch.bfloat16}
    assert sum(p.untyped_storage().nbytes() for p in shared.products) == 3072
    assert shared.grads is None  # not before backward
    seen_grads = []
    add_grad = shared.add_grad

    def watched(k, out_grads):
        add_grad(k, out_grads)
        grads = shared.grads
        seen_grads.append((k, [tuple(g.shape) for g in grads], {g.dtype for g in grads},
                           sum(g.untyped_storage().nbytes() for g in grads)))

    shared.add_grad = watched
    loss.backward()
    # backward runs the steps last to first; one G throughout
    assert seen_grads == [(k, [(2, 12, 32), (2, 12, 16), (2, 12, 16)], {torch.float32}, 6144) for k in (2, 1, 0)]
    assert shared.products is None and shared.grads is None  # both gone at the last call

