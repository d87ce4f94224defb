"""The one-GPU sft step as ordered allocations (fitplan/estimator/sft_events.py).

- Consistency: the sequence is written from the estimator's sft terms, so the most bytes live at
  once in each phase is that phase's sum (backward may add parameter gradients, as for eagle3).
- Sizes of single tensors by hand from the models' shapes.
- Everything not persistent is freed by the end of the step.
"""

from __future__ import annotations

import pytest
from step_checks import assert_peak_is_phase_sum, live_after, phase_total

from fitplan.config import RunSpec
from fitplan.estimator import estimate, sft_events, step_events
from fitplan.layout import resolve


def job(**kw):
    return resolve(RunSpec(**{"model": "llama-3.1-8b", "gpus": "1xH200", "workload": "sft", "seq": 2048,
                              "micro_batch": 1, "ac": True, "precision": "bf16", **kw}))


CASES = [
    {},
    {"ac": False},
    {"micro_batch": 4},
    {"ac": False, "micro_batch": 4, "seq": 1024},
    {"precision": "bf16-master"},
    {"precision": "mixed"},
    {"precision": "fp32-autocast"},
    {"precision": "fp32-autocast", "ac": False},
    {"model": "qwen3-8b", "seq": 8192},
    {"model": "qwen3-8b", "micro_batch": 4, "seq": 6912},
    {"model": "qwen3-8b", "ac": False, "seq": 1024},
    {"model": "qwen3-8b", "precision": "mixed", "micro_batch": 4},
    {"model": "qwen3-8b", "micro_batch": 4, "seq": 10752, "expandable_segments": True},
    {"seq": 512},  # few tokens: backward's peak is its end (all grads), not its start (the loss)
    {"global_batch": 3, "seq": 1024},  # three micro-steps: grads carried between them
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in kw.items()) or "default" for kw in CASES])
def test_live_bytes_at_each_phase_peak_are_the_estimators_phase_sum(kw):
    j = job(**kw)
    est, built = estimate(j), step_events.build(j)
    grads = est.phases["optimizer_step"].get("model.grads", 0)
    for label, live in built.live_peaks().items():
        assert_peak_is_phase_sum(label, live, phase_total(est, label), grads)


@pytest.mark.parametrize("precision", ["bf16", "mixed", "bf16-master", "fp32-autocast"])
def test_what_outlives_the_step_is_weights_and_optimizer_state(precision):
    j = job(precision=precision)
    assert live_after(step_events.build(j)) == estimate(j).phase_allocated("checkpoint")


def test_parameters_by_hand():
    # llama-3.1-8b: h 4096, I 14336, 32 layers, 32 heads of 128, 8 KV heads, vocab 128256, untied
    params = dict(sft_events.parameters(job()))
    assert params["embed_tokens"] == params["lm_head"] == 128256 * 4096 == 525_336_576
    assert params["layers.0.q_proj"] == 4096 * 4096
    assert params["layers.0.k_proj"] == 4096 * 1024
    assert params["layers.0.gate_proj"] == 4096 * 14336 == 58_720_256
    assert params["layers.0.norms and biases"] == 2 * 4096  # two RMSNorms, no biases
    # Meta's published count for Llama 3.1 8B: 8,030,261,248 parameters
    assert sum(n for _, n in sft_events.parameters(job())) == 8_030_261_248


def test_loss_tensors_by_hand():
    # seq 2048, batch 1, vocab 128256: bf16 logits 2 x 2048 x 128256 = 525,336,576 B
    j = job()
    built = step_events.build(j)
    sizes = {built.names[e.key]: e.size for e in built.events if e.op == "alloc"}
    assert sizes["logits [B*S, V] bf16"] == 525_336_576
    assert sizes["log-softmax fp32"] == sizes["grad of log-softmax output"] == 1_050_673_152


def test_not_written_for_what_it_does_not_model():
    assert "several GPUs" in step_events.sequence_unsupported(
        resolve(RunSpec(model="llama-3.1-8b", gpus="2xH200", workload="sft", seq=2048, sharding="zero2")))
    assert "optimizer" in step_events.sequence_unsupported(job(optimizer="adamw-8bit"))


def test_sft_keeps_the_fitted_reserve_until_its_replay_is_validated():
    j = job()
    assert step_events.sequence_unsupported(j) is None  # the sequence is written...
    assert step_events.unsupported(j) == step_events.SFT_KEPT  # ...but the estimate does not take it
    assert estimate(j).replay is None


def test_the_written_replay_calls_every_measured_sft_oom_oom():
    """The matrix's one-GPU sft rows that OOMed on the GPU (qwen3-8b b4 at s8960, s10752, s12032,
    with and without expandable segments): the replay of the written step must not say `fits`."""
    from pathlib import Path

    from fitplan.validation import replay_table

    rows = replay_table.matrix_rows(Path(__file__).parent / "data" / "gpu", workload="sft", written=True)
    ooms = [r for r in rows if r.outcome == "oom"]
    assert len(ooms) == 4
    assert [r.name for r in ooms if r.replayed.fits] == []
