"""trainer/teacher_kernel.py's one-pass teacher table against trainer/loss.py `make_teacher`'s torch
path, run on the CPU through Triton's interpreter: the draft-vocab table and which positions
count (the target's first argmax over its whole vocab in the draft vocab), for bf16 and fp32
logits, batches of two, draft ids sorted and not, vocabularies spanning several column blocks
with a partial last one, and argmax ties. On a GPU, `make_teacher`
through the compiled kernel against its torch path.
"""

from __future__ import annotations

import pytest
from triton_interpreter import run_interpreted

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton not installed: the teacher kernel is not tested (pip install triton)")

from trainer import lean_ops, loss  # noqa: E402

KERNEL_MODULE = "trainer.teacher_kernel"
RUN_INTERPRETED = """
import sys, torch
from trainer.teacher_kernel import teacher_from_logits
cases = torch.load(sys.argv[1])
torch.save({name: teacher_from_logits(logits, ids, ttt, block=block)
            for name, (logits, ids, ttt, block) in cases.items()}, sys.argv[2])
"""


def _random_case(batch, seq, vocab, draft_vocab, dtype, sort, seed):
    """Logits [batch, seq, vocab] rounded to halves (bf16 ties within a row are then common),
    draft ids a random subset, sorted or in random order, ttt 3."""
    g = torch.Generator().manual_seed(seed)
    logits = ((torch.randn(batch, seq, vocab, generator=g) * 4).round() / 2).to(dtype)
    ids = torch.randperm(vocab, generator=g)[:draft_vocab]
    return logits, ids.sort().values if sort else ids, 3


def _tie_case():
    """Ten target ids, draft ids [7, 2, 5] (columns 0, 1, 2), blocks of four. Position 0: the target's max 3.0 at ids 2 and 7 -> first argmax 2 (draft). Position
    1: max 5.0 at ids 4 (not draft) and 5 (draft) -> 4, not counted. Position 2: all zeros ->
    target top 0 (not draft)."""
    logits = torch.zeros(1, 3, 10)
    logits[0, 0, [2, 7]] = 3.0
    logits[0, 1, [4, 5]] = 5.0
    return logits.bfloat16(), torch.tensor([7, 2, 5]), 2, 4


# batch, seq, vocab, draft vocab, columns per block: several blocks with a partial last one, and
# a row shorter than one block (64 columns: next_power_of_2(40))
SHAPES = [(2, 5, 300, 70, 64), (1, 4, 40, 9, 128), (2, 3, 128, 128, 32)]
CASES = {
    **{f"{b}x{s}x{v}/{d}/{block}-{str(dtype)[6:]}-{'sorted' if sort else 'shuffled'}":
       (*_random_case(b, s, v, d, dtype, sort, b + s + v), block)
       for b, s, v, d, block in SHAPES for dtype in (torch.bfloat16, torch.float32) for sort in (True, False)},
    "ties": _tie_case(),
    # a draft vocab past int16's 32767: the column map is int32
    "1x4x41000/40000/1024-bfloat16-shuffled": (*_random_case(1, 4, 41000, 40000, torch.bfloat16, False, 5), 1024),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(RUN_INTERPRETED, CASES, tmp_path_factory.mktemp("teacher_kernel"))


def _mask(logits):
    """A loss mask with holes, so that counting depends on it too."""
    mask = torch.ones(logits.shape[:2], dtype=torch.bool)
    mask[:, 2] = False
    return mask


@pytest.mark.parametrize("name", [name for name in CASES if name != "ties"])
def test_kernel_matches_torch(interpreted, name):
    logits, ids, ttt, *_ = CASES[name]
    table, target_top = interpreted[name]
    t2d = torch.zeros(logits.shape[-1], dtype=torch.bool)
    t2d[ids] = True
    want = loss.make_teacher(logits, _mask(logits), ids, t2d, ttt)  # CPU: the torch path
    assert table.dtype == logits.dtype and target_top.dtype == torch.int32
    assert torch.equal(table, want.table)
    assert torch.equal(target_top.long(), logits.float().argmax(-1))
    assert torch.equal(loss._counted(_mask(logits), t2d, target_top, ttt), want.valid)


def test_the_column_map_is_int16_where_every_draft_column_fits():
    from trainer.teacher_kernel import draft_columns

    small, large = draft_columns(torch.tensor([3, 1]), 5), draft_columns(torch.arange(40000), 41000)
    assert small.dtype == torch.int16 and small.tolist() == [-1, 1, -1, 0, -1]
    assert large.dtype == torch.int32 and int(large[39999]) == 39999 and int(large[40000]) == -1


def test_ties_by_hand(interpreted):
    table, target_top = interpreted["ties"]
    assert target_top.tolist() == [[2, 4, 0]]
    assert table[0, 0].float().tolist() == [3.0, 3.0, 0.0]  # ids 7, 2, 5
    assert table[0, 1].float().tolist() == [0.0, 0.0, 5.0]
    assert table[0, 2:].abs().sum() == 0  # position 2's zeros and two padding rows
    t2d = torch.zeros(10, dtype=torch.bool)
    t2d[[7, 2, 5]] = True
    counted = loss._counted(torch.ones(1, 3, dtype=torch.bool), t2d, target_top, 2)
    assert counted.tolist() == [[True, False, False, False, False]]  # position 1's top is id 4; 2 is the last


def test_make_teacher_keeps_torch_off_cuda(monkeypatch):
    """A CPU teacher never asks for the kernel module (so a CPU run never imports triton)."""
    asked = []
    monkeypatch.setattr(loss, "triton_module", lambda name: asked.append(name))
    logits = torch.zeros(1, 3, 10, dtype=torch.bfloat16)
    loss.make_teacher(logits, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1, 2]),
                      torch.zeros(10, dtype=torch.bool), 2)
    assert asked == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sort", [True, False])
def test_make_teacher_on_cuda_matches_torch(sort):
    """On CUDA make_teacher runs the kernel (compiled), and gives what its torch path gives."""
    logits, ids, ttt = _random_case(2, 300, 4000, 1000, torch.bfloat16, sort, 7)
    logits, ids = logits.cuda(), ids.cuda()
    t2d = torch.zeros(logits.shape[-1], dtype=torch.bool, device="cuda")
    t2d[ids] = True
    mask = _mask(logits).cuda()
    made = loss.make_teacher(logits, mask, ids, t2d, ttt)
    want = loss.make_teacher(logits.cpu(), mask.cpu(), ids.cpu(), t2d.cpu(), ttt)
    assert lean_ops.triton_module("teacher_kernel") is not None
    assert torch.equal(made.table.cpu(), want.table) and torch.equal(made.valid.cpu(), want.valid)
    assert torch.equal(made.top.cpu(), want.top)
    assert torch.allclose(made.lse.cpu(), want.lse, rtol=1e-6, atol=1e-6)
