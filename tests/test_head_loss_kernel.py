"""trainer/head_loss_kernel.py's Triton kernel against trainer/head_loss.py `_chunk_loss_grad`
(eager torch), run on the CPU through Triton's interpreter: loss, top-1 agreements and the bf16
logit gradient, for teachers given as bf16 logits and as fp32 probabilities, rows gathered out
of order, vocabularies spanning several column blocks with a partial last one, and argmax ties;
the gradient written over the logits (reuse_logits). Also which function the head uses on CUDA
with and without triton.
"""

from __future__ import annotations

import math
import sys

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the Triton head kernel is not tested (pip install triton)")

from trainer import head_loss, lean_ops  # noqa: E402

KERNEL_MODULE = "trainer.head_loss_kernel"
# run by tests/triton_interpreter.py in a process of its own
RUN_INTERPRETED = """
import sys, torch
from trainer.head_loss_kernel import chunk_loss_grad, teacher_stats
cases = torch.load(sys.argv[1])
out = {name: chunk_loss_grad(*args, block=block) for name, (args, block) in cases.items()}
for name, (args, block) in cases.items():  # the gradient written over a copy of the logits
    logits = args[0].clone()
    out[f"reuse/{name}"] = (*chunk_loss_grad(logits, *args[1:], block=block, reuse_logits=True), logits)
out.update({f"stats/{name}": teacher_stats(args[1], block=block) for name, (args, block) in cases.items()
            if args[4] is not None})
torch.save(out, sys.argv[2])
"""


def _random_case(rows, vocab, as_logits, seed):
    """(bf16 logits [rows, vocab], teacher [rows + 4, vocab], p_rows: distinct teacher rows in
    shuffled order, scale, the teacher's row statistics or None for probabilities)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).bfloat16()
    if as_logits:
        teacher = (torch.randn(rows + 4, vocab, generator=g) * 3).bfloat16()
    else:  # probabilities whose rows sum to 0.3-1, as a masked or truncated teacher's would
        teacher = torch.softmax(torch.randn(rows + 4, vocab, generator=g) * 3, -1)
        teacher *= 0.3 + 0.7 * torch.rand(rows + 4, 1, generator=g)
    p_rows = torch.randperm(rows + 4, generator=g)[:rows]
    return logits, teacher, p_rows, torch.tensor(0.37), _stats(teacher, as_logits)


def _stats(teacher, as_logits):
    """What the head hands the kernel beside a teacher: torch's row statistics of logits (the
    reference; the kernel's own are checked against them), None for probabilities."""
    return head_loss._torch_teacher_stats(teacher) if as_logits else None


def _tie_case(as_logits):
    """Eight columns. Logits' first maxima: row 0 columns 1 and 5 -> 1; row 1 columns 2 and 3
    -> 2; row 2 columns 6 and 7 -> 6. Teacher's: 1, 3 and 6 (tied with 7)."""
    logits = torch.zeros(3, 8)
    logits[0, [1, 5]] = 2.0
    logits[1, [2, 3]] = 2.0
    logits[2, [6, 7]] = 2.0
    teacher = torch.zeros(4, 8)
    teacher[3, 1] = 1.0  # gathered for row 0
    teacher[0, 3] = 1.0  # row 1
    teacher[1, [6, 7]] = 1.0  # row 2
    teacher = teacher.bfloat16() if as_logits else teacher / teacher.sum(-1, keepdim=True)
    return logits.bfloat16(), teacher, torch.tensor([3, 0, 1]), torch.tensor(1.0), _stats(teacher, as_logits)


def _lane_tie_case(as_logits):
    """Fifteen columns in blocks of four (lane = column % 4, the last block partial), maxima
    tied across lanes and blocks; each row's unique max on the other side sits at the first
    argmax, so a row agrees only if that is found. Logits' ties: row 0 columns 6, 9 and 13
    (lanes 2, 1, 1) -> 6, where the lowest lane holding the max would give 9; row 1 columns 3
    and 5 (lane 3 of block 0, lane 1 of block 1) -> 3, the lowest lane giving 5; row 2 columns
    2, 6 and 10 (all lane 2) -> 2, a lane replacing its best on an equal value giving 10. Rows
    3 and 4 tie the teacher likewise (6, 9, 13 and 3, 5). Row 5 ties the logits at 7 and 12
    (lanes 3 and 0) -> 7 against the teacher's 12: it must not agree. So 5 of the 6 agree."""
    ties = [[6, 9, 13], [3, 5], [2, 6, 10], [6], [3], [7, 12]]
    teacher_ties = [[6], [3], [2], [6, 9, 13], [3, 5], [12]]
    logits = torch.zeros(6, 15)
    teacher = torch.zeros(7, 15)
    p_rows = torch.tensor([6, 0, 5, 1, 4, 2])
    for row, (z_cols, t_cols) in enumerate(zip(ties, teacher_ties)):
        logits[row, z_cols] = 2.0
        teacher[p_rows[row], t_cols] = 1.0
    teacher = teacher.bfloat16() if as_logits else teacher / teacher.sum(-1, keepdim=True).clamp(min=1)
    return logits.bfloat16(), teacher, p_rows, torch.tensor(1.0), _stats(teacher, as_logits)


# rows, vocab, columns per block: several blocks with a partial last one, one whole block, and a
# row shorter than its block (16 columns: next_power_of_2(12)), whose last lanes see no column
SHAPES = [(5, 37, 16), (9, 64, 64), (6, 100, 32), (4, 12, 64)]
TWO_COLUMNS, ROW_0, SCALE_2 = torch.zeros(1, 2, dtype=torch.bfloat16), torch.tensor([0]), torch.tensor(2.0)
CASES = {
    **{f"random-{rows}x{vocab}/{block}-{as_logits}": (_random_case(rows, vocab, as_logits, rows + vocab), block)
       for rows, vocab, block in SHAPES for as_logits in (True, False)},
    # blocks of four: the ties of rows 0 and 2 span two blocks, row 1's lies within one
    **{f"ties-{as_logits}": (_tie_case(as_logits), 4) for as_logits in (True, False)},
    # blocks of four: ties across lanes, where the first argmax is the smallest column, not lane
    **{f"lane-ties-{as_logits}": (_lane_tie_case(as_logits), 4) for as_logits in (True, False)},
    "hand-probabilities": ((TWO_COLUMNS, torch.tensor([[0.5, 0.0]]), ROW_0, SCALE_2, None), 4),
    "hand-logits": ((TWO_COLUMNS, TWO_COLUMNS, ROW_0, SCALE_2, _stats(TWO_COLUMNS, True)), 4),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's (loss, agreements, gradient) from the kernel run by Triton's interpreter."""
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("head_loss_kernel"))


def _assert_matches_torch(mine, logits, teacher, p_rows, scale, stats):
    loss, agree, grad = mine
    want_loss, want_agree, want_grad = head_loss._chunk_loss_grad(logits, teacher, p_rows, scale, stats)
    assert loss.dtype == torch.float32 and agree.dtype == torch.int64 and grad.dtype == logits.dtype
    assert loss.shape == agree.shape == () and grad.shape == logits.shape
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert int(agree) == int(want_agree)
    assert torch.allclose(grad.float(), want_grad.float(), rtol=0, atol=1e-2 * float(scale))


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("random")])
def test_kernel_matches_torch(interpreted, name):
    _assert_matches_torch(interpreted[name], *CASES[name][0])


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("random")])
def test_gradient_written_over_the_logits(interpreted, name):
    """reuse_logits: the gradient is the logits' own storage (saved together, they stay shared)
    and its values are those of a separate gradient."""
    loss, agree, grad, logits = interpreted[f"reuse/{name}"]
    assert grad.data_ptr() == logits.data_ptr()
    _assert_matches_torch((loss, agree, grad), *CASES[name][0])
    assert torch.equal(grad, interpreted[name][2])


@pytest.mark.parametrize("as_logits", [True, False])
def test_agreements_follow_torch_argmax_ties(interpreted, as_logits):
    """_tie_case: rows 0 and 2 agree (1 and 1, 6 and 6), row 1 does not (2 against 3)."""
    name = f"ties-{as_logits}"
    assert int(interpreted[name][1]) == 2
    _assert_matches_torch(interpreted[name], *CASES[name][0])


@pytest.mark.parametrize("as_logits", [True, False])
def test_agreements_follow_torch_argmax_ties_across_lanes(interpreted, as_logits):
    """_lane_tie_case: rows 0-4 agree, row 5 does not."""
    name = f"lane-ties-{as_logits}"
    logits, teacher, p_rows = CASES[name][0][:3]
    assert logits.float().argmax(-1).tolist() == [6, 3, 2, 6, 3, 7]  # the case is what it says
    assert teacher.float()[p_rows].argmax(-1).tolist() == [6, 3, 2, 6, 3, 12]
    assert int(interpreted[name][1]) == 5
    _assert_matches_torch(interpreted[name], *CASES[name][0])


def test_loss_and_gradient_by_hand(interpreted):
    """z = [0, 0]: softmax [1/2, 1/2]. Teacher probabilities [1/2, 0] (summing to 1/2): loss
    -(1/2) log(1/2) = ln(2)/2; gradient (softmax x 1/2 - p) x 2 = ([1/4, 1/4] - [1/2, 0]) x 2
    = [-1/2, 1/2]. Teacher logits [0, 0]: p = [1/2, 1/2], loss ln 2, gradient 0."""
    loss, agree, grad = interpreted["hand-probabilities"]
    assert float(loss) == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert int(agree) == 1
    assert grad.float().tolist() == [[-0.5, 0.5]]
    loss, _, grad = interpreted["hand-logits"]
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    assert grad.float().tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("name", [name for name in CASES if CASES[name][0][4] is not None])
def test_teacher_stats_kernel_matches_torch(interpreted, name):
    """The one-pass row statistics (log-sum-exp and first argmax, ties included) as torch's."""
    lse, top = interpreted[f"stats/{name}"]
    want_lse, want_top = CASES[name][0][4]
    assert lse.dtype == torch.float32 and top.dtype == torch.int32
    assert torch.allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(top, want_top)


def test_teacher_of_logits_by_hand():
    """Logits [0, ln 3] over two words: probabilities [1/4, 3/4], log-sum-exp ln 4, argmax 1.
    _tie_case's teacher rows: a one at column 3; ones at 6 and 7 (the first, 6); all zeros (0);
    a one at column 1."""
    lse, top = head_loss._torch_teacher_stats(torch.tensor([[0.0, math.log(3)]]))
    assert float(lse) == pytest.approx(math.log(4), rel=1e-6) and top.tolist() == [1]
    _, teacher, *_ = _tie_case(True)
    assert head_loss._torch_teacher_stats(teacher)[1].tolist() == [3, 6, 0, 1]


def test_cuda_uses_the_kernel_where_triton_imports(monkeypatch):
    lean_ops.triton_module.cache_clear()
    assert head_loss._kernels("cuda")[2].__module__ == KERNEL_MODULE
    assert head_loss._kernels("cpu")[2] is head_loss._chunk_loss_grad
    monkeypatch.setitem(sys.modules, KERNEL_MODULE, None)  # its import now fails as without triton
    lean_ops.triton_module.cache_clear()
    try:
        fallback = head_loss._kernels("cuda")[2]
    finally:
        lean_ops.triton_module.cache_clear()
    assert fallback._torchdynamo_orig_callable is head_loss._chunk_loss_grad
