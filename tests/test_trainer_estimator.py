"""The estimator against the real trainer: per-phase live bytes on CPU under the live-storage tracker.

What a CPU tracker cannot see is excluded on both sides: the estimator's cuBLAS workspace
(`runtime.workspace`), allocator rounding and everything outside the allocator.

Two corrections belong to fitplan/estimator/eagle3.py (not the draft terms) and are applied
here by name until that timeline has them; the strict xfail below fails once it does:
  - draft_forward lacks `draft_terms.draft_forward_extra_bytes` (the last TTT step's logits
    tail and the unroll's k/v lists);
  - backward counts every draft gradient at its peak, but the peak is at the start of backward,
    before any gradient is allocated (with accum 1 none is carried in).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from fitplan.config import RunSpec  # noqa: E402
from fitplan.estimator import draft_terms  # noqa: E402
from fitplan.layout import resolve  # noqa: E402
from trainer.loop import run  # noqa: E402
from trainer.options import TrainOptions  # noqa: E402

from test_trainer import DRAFT, TARGET  # noqa: E402  (pytest puts tests/ on the path)

TOLERANCE = 0.05
CHECKED = ("target_forward", "draft_forward", "backward", "optimizer_step", "checkpoint")
CONFIGS = [  # (micro_batch, ttt, ac)
    (1, 1, False), (2, 1, False), (1, 3, False), (2, 3, False), (1, 3, True), (2, 3, True),
]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimator")
    (d / "target.json").write_text(json.dumps(TARGET))
    (d / "draft.json").write_text(json.dumps({**DRAFT, "draft_vocab_size": 256}))
    return str(d / "target.json"), str(d / "draft.json")


def measure(configs, tmp_path, micro_batch, ttt, ac):
    target, draft = configs
    spec = RunSpec(model=target, draft=draft, seq=32, micro_batch=micro_batch, ttt=ttt, ac=ac, tp=1,
                   attention="eager")
    report = run(TrainOptions(spec=spec, output=tmp_path, steps=2, random_weights=True, synthetic_data=True,
                              device="cpu"))
    return resolve(spec), report


def predicted(report, phase: str) -> int:
    components = report["prediction"]["phase_components"][phase]
    return sum(v for name, v in components.items() if name != "runtime.workspace")


def pending_eagle3_corrections(job, report, phase: str) -> int:
    if phase == "draft_forward":
        return draft_terms.draft_forward_extra_bytes(job)
    if phase == "backward":
        return -report["prediction"]["phase_components"]["backward"].get("draft.grads", 0)
    return 0


@pytest.mark.parametrize("micro_batch,ttt,ac", CONFIGS)
def test_estimator_phases_match_tracked_live_bytes(configs, tmp_path, micro_batch, ttt, ac):
    job, report = measure(configs, tmp_path, micro_batch, ttt, ac)
    steady = report["steps"][1]["phases"]
    errors = {}
    for phase in CHECKED:
        expected = predicted(report, phase) + pending_eagle3_corrections(job, report, phase)
        errors[phase] = (steady[phase]["allocated"] - expected) / expected
    assert all(abs(e) <= TOLERANCE for e in errors.values()), {p: f"{100 * e:+.1f}%" for p, e in errors.items()}


@pytest.mark.xfail(strict=True, reason="eagle3.timeline: no draft_forward extra; all draft grads at the backward peak")
def test_eagle3_timeline_needs_no_corrections(configs, tmp_path):
    _, report = measure(configs, tmp_path, 1, 1, False)
    steady = report["steps"][1]["phases"]
    for phase in ("draft_forward", "backward"):
        expected = predicted(report, phase)
        assert abs(steady[phase]["allocated"] - expected) <= TOLERANCE * expected
