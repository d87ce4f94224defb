"""The several-GPU step as ordered allocations: the draft's FSDP2 zero2 (fitplan/estimator/fsdp_events.py)
and the TP target's output exchange (step_events.exchange), and why the estimate keeps the fitted
reserve there (the replay against the measured 2- and 4-H200 runs, fitplan/validation/replay_table.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from step_checks import assert_peak_is_phase_sum, live_after, phase_total

from fitplan.config import RunSpec
from fitplan.estimator import estimate, fsdp_events, step_events
from fitplan.estimator.eagle3 import draft_state
from fitplan.estimator.result import Verdict
from fitplan.layout import fused_norms, resolve
from fitplan.validation import replay_table

GPU_DATA = Path(__file__).parent / "data" / "gpu"


def job(**kw):
    return resolve(RunSpec(**{"model": "llama-3.2-1b", "gpus": "2xH200", "seq": 4096, **kw}))


CASES = [
    {},  # FSDP only: world 2, tp 1
    {"gpus": "4xH200", "draft_memory": "plain"},
    {"model": "qwen3-8b", "tp": 2, "draft_memory": "plain"},  # a measured layout
    {"model": "qwen3-8b", "tp": 2, "output_sharding": "all-to-all", "seq": 2048},
    {"model": "llama-3.1-8b", "gpus": "4xH200", "tp": 2, "seq": 8192},  # two TP groups
    {"precision": "bf16", "attention": "sdpa", "seq": 2048},
    {"recompute_norms": False},  # the final norm a unit of its own, its grad freed with it
    {"optimizer_per_param": False},  # every grad copy at once
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in kw.items()) or "fsdp" for kw in CASES])
def test_live_bytes_at_each_phase_peak_are_the_estimators_phase_sum(kw):
    """As on one GPU; load is compared where it ends: the whole layers and the whole draft that
    are split there (the estimator counts what stays) make its transient peak. Through the
    draft forward FSDP2's comm context also keeps the last unit's all-gather buffer (the head,
    gathered last, at step 0's loss) until the root's post-forward: the whole [Vd, h] bf16 head,
    with fused norms and its final norm [h]; the estimator's phase sum leaves it out."""
    j = job(**kw)
    assert step_events.sequence_unsupported(j) is None
    est, built = estimate(j), step_events.build(j)
    grads = draft_state(j).grads()  # every gradient (the step a parameter at a time holds fewer)
    load_end = built.phases[1][1]
    assert live_after(built, load_end) == pytest.approx(est.phase_allocated("load"), rel=1e-4)
    for label, live in built.live_peaks().items():
        if label == "load":
            assert live > est.phase_allocated("load")
            continue
        total = phase_total(est, label)
        if label.endswith("draft_forward"):
            d = j.draft
            total += 2 * (d.draft_vocab * d.hidden + (d.hidden if fused_norms(j) else 0))
        if kw.get("output_sharding") == "all-to-all" and label.endswith("target_forward"):
            # the estimator counts the captured states at the rank's own rows; the target runs
            # (and captures) the TP group's: 3 x h x (tp - 1) x B x S bf16 more here
            extra = 3 * 4096 * 2048 * 2
            assert live == pytest.approx(total + extra, rel=0.002), (label, live, total)
        else:
            assert_peak_is_phase_sum(label, live, total, grads)


def named(j, name: str) -> list[tuple[int, int]]:
    built = step_events.build(j)
    return [(e.size, e.stream) for e in built.events if e.op == "alloc" and built.names[e.key] == name]


def test_fsdp_sizes_and_streams_by_hand():
    # llama-3.2-1b's draft on 2 ranks: lm_head [32000, 2048] bf16 = 131,072,000 B whole,
    # 65,536,000 B per shard; the MLP's three [2048, 8192] and the attention (q [4096 -> 2048],
    # k and v [4096 -> 512], o [2048 -> 2048]) and three norms form `midlayer`
    j = job(recompute_norms=False)
    assert named(j, "draft.lm_head") == [(65_536_000, 0)]
    # gathered in forward and again before each of the 6 earlier TTT steps' backward
    assert named(j, "FSDP all-gather lm_head") == [(131_072_000, fsdp_events.ALL_GATHER_STREAM)] * 7 * 2
    assert named(j, "unsharded lm_head") == [(131_072_000, 0)] * 7 * 2
    # one reduce-scatter per TTT step: the whole unit's bf16 grads in (made on the compute stream,
    # before foreach_reduce enters the reduce-scatter stream), its shard out on that stream
    assert named(j, "FSDP reduce-scatter input lm_head") == [(131_072_000, 0)] * 7 * 2
    assert named(j, "sharded grad lm_head") == [(65_536_000, fsdp_events.REDUCE_SCATTER_STREAM)] * 7 * 2
    # fused norms (the default): the final norm [2048] bf16 is one unit with the head, 4096 B more
    # gathered and reduced with it (2048 B of it per shard), and no unit of its own
    j = job()
    assert named(j, "FSDP all-gather lm_head") == [(131_076_096, fsdp_events.ALL_GATHER_STREAM)] * 7 * 2
    assert named(j, "FSDP reduce-scatter input lm_head") == [(131_076_096, 0)] * 7 * 2
    assert named(j, "sharded grad lm_head") == [(65_538_048, fsdp_events.REDUCE_SCATTER_STREAM)] * 7 * 2
    assert named(j, "FSDP all-gather norm") == []
    midlayer = 2 * (3 * 2048 * 8192 + 4096 * 2048 + 2 * 4096 * 512 + 2048 * 2048 + 3 * 2048)
    assert named(j, "FSDP reduce-scatter input midlayer")[0] == (midlayer, 0)
    # bf16-master's masters (split: 16 low bits) and fp32 moments are per shard: 2 and 4 B x 32,768,000
    assert named(j, "master lm_head") == [(65_536_000, 0)]
    assert named(j, "exp_avg lm_head") == [(131_072_000, 0)]


def test_tp_exchange_by_hand_and_as_measured():
    """qwen3-8b, tp 2, B 1, S 4096: the target runs the group's 8192 rows; the rank's logits
    shard [8192, 151936 / 2] bf16 is 1,244,659,712 B, the figure measured on two H200s
    (tests/data/gpu/multi_h200x2_tp2_collect.json, logits_local_bytes). gather's output buffer
    and its row-ordered copy are [8192, 151936] bf16 each; all-to-all's [4096, 151936]."""
    j = job(model="qwen3-8b", tp=2, draft_memory="plain")
    assert named(j, "target logits shard [T_g, V/tp] bf16")[0] == (1_244_659_712, 0)
    assert named(j, "gather output buffer")[0] == (2 * 8192 * 151936, 0) == (2_489_319_424, 0)
    assert named(j, "exchanged logits, rows in order")[0] == (2_489_319_424, 0)
    j = job(model="qwen3-8b", tp=2, draft_memory="plain", output_sharding="all-to-all")
    assert named(j, "all-to-all output buffer")[0] == (2 * 4096 * 151936, 0)
    # each layer is made whole, then split: q_proj [4096, 4096] bf16 whole, half kept
    assert named(j, "target.layers.0.q_proj (whole, before the split)") == [(2 * 4096 * 4096, 0)]
    assert named(j, "target.layers.0.q_proj") == [(4096 * 4096, 0)]


@pytest.mark.parametrize("kw", [{"sharding": "zero3"}, {"precision": "mixed"}, {"ac": True}, {"global_batch": 4}])
def test_what_fsdp_does_not_write_is_refused(kw):
    assert step_events.sequence_unsupported(job(**kw))


def test_several_gpus_keep_the_fitted_reserve():
    j = job(model="qwen3-8b", tp=2)
    assert step_events.sequence_unsupported(j) is None
    assert step_events.unsupported(j) == step_events.SEVERAL_GPUS
    assert estimate(j).replay is None


def test_the_replay_against_the_measured_several_gpu_runs():
    """Why several GPUs keep the fitted reserve: 9 `fitplan train` runs and the matrix's 18
    several-GPU Eagle3 rows. The replay is never `fits` where a run OOMed, but it under-predicts
    qwen3-8b on two H200s and llama-3.1-8b b4 by more than 3% (the goal), which the fitted
    reserve does on one row only."""
    rows = replay_table.multi_rows(GPU_DATA)
    assert len(rows) == 27
    replayed = [r for r in rows if r.replayed is not None]
    assert len(replayed) == 25  # the two zero3 rows are not written
    for r in replayed:
        if r.outcome == "oom":
            assert r.replayed.verdict == Verdict.OOM, r.name
    under = [r.name for r in replayed if r.meas_device and r.device_error(r.replayed) < -3.0]
    fitted_under = [r.name for r in rows if r.meas_device and r.device_error(r.fitted) < -3.0]
    assert len(under) > len(fitted_under)


def test_all_gather_buffers_live_as_fsdp2_keeps_them():
    """Forward: FSDP2's comm context keeps a unit's all-gather buffer until the next unit's
    all-gather has made its own (wait_for_unshard), the last one (the head's) until the root's
    post-forward. Backward: a unit gathered again frees its buffer once copied out. (TP 2: the
    draft's embedding is its own copy, a unit.)"""
    j = job(gpus="4xH200", tp=2, recompute_norms=False)
    built = step_events.build(j)
    order = [(e.op, built.names[e.key]) for e in built.events if built.names[e.key].startswith("FSDP all-gather")]
    step1 = order[:order.index(("free", "FSDP all-gather lm_head"))]
    assert step1 == [("alloc", "FSDP all-gather fc"), ("alloc", "FSDP all-gather embed_tokens"),
                     ("free", "FSDP all-gather fc"), ("alloc", "FSDP all-gather midlayer"),
                     ("free", "FSDP all-gather embed_tokens"), ("alloc", "FSDP all-gather norm"),
                     ("free", "FSDP all-gather midlayer"), ("alloc", "FSDP all-gather lm_head"),
                     ("free", "FSDP all-gather norm")]
    # the head's buffer [32000, 2048] bf16 is the one live when the draft forward ends
    phases = {label: (first, end) for label, first, end in built.phases}
    first, end = phases["step1.draft_forward"]
    keys = {e.key for e in built.events[:end] if e.op == "alloc"} - {e.key for e in built.events[:end] if e.op == "free"}
    assert [built.names[k] for k in keys if built.names[k].startswith("FSDP all-gather")] == ["FSDP all-gather lm_head"]
    assert named(j, "FSDP all-gather lm_head")[0] == (2 * 32000 * 2048, fsdp_events.ALL_GATHER_STREAM)
    # backward: it goes first; then each buffer is freed before the next all-gather
    first, end = phases["step1.backward"]
    backward = [(e.op, built.names[e.key]) for e in built.events[first:end] if built.names[e.key].startswith("FSDP all-gather")]
    assert backward[0] == ("free", "FSDP all-gather lm_head")
    assert len(backward) == 1 + 2 * 3 * 6  # head, norm, layer gathered again for steps 5..0
    assert all(a[0] == "alloc" and b == ("free", a[1]) for a, b in zip(backward[1::2], backward[2::2]))
