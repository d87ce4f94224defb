"""The one-GPU step as ordered allocations (fitplan/estimator/step_events.py, draft_events.py) and
its replay through the caching allocator model (replayed.py), which gives fitplan's trainer on one
GPU its device level and verdict.

- Consistency: the sequence is written from the estimator's terms, so the most bytes live at once
  in each phase is that phase's sum (backward may add the parameter gradients the trainer holds by
  then, which the estimator's backward instants leave out).
- Sizes of single tensors, by hand from the draft's shapes.
- The replay against the committed one-GPU reports of the trainer (tests/data/gpu/lean, knobs,
  profiles) and the verdicts of the one-GPU near-limit rows of the validation matrix.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
from step_checks import assert_peak_is_phase_sum, case_ids, live_after, phase_total

from fitplan.allocator import Allocator, replay
from fitplan.config import RunSpec
from fitplan.estimator import estimate, replayed, step_events
from fitplan.estimator.eagle3 import draft_state
from fitplan.estimator.result import Verdict
from fitplan.estimator.step_trace import loop_chunks
from fitplan.layout import resolve
from fitplan.validation import replay_table

GPU_DATA = Path(__file__).parent / "data" / "gpu"

MIB, GIB = 2**20, 2**30


def job(**kw):
    return resolve(RunSpec(**{"model": "llama-3.2-1b", "gpus": "1xH200", "seq": 4096, **kw}))


CASES = [
    {},
    {"recompute_norms": False},
    {"recompute_norms": False, "ac": True},
    {"recompute_mlp": True},
    {"recompute_mlp": True, "ac": True, "seq": 8192},
    {"recompute_mlp": True, "precision": "mixed"},
    {"head_grad_in_forward": False},  # the head's logits made again in backward
    {"head_grad_in_forward": False, "ac": True, "seq": 8192},
    {"global_batch": 2, "seq": 2048},  # a second micro-step's head sum beside the first's .grad
    {"draft_memory": "plain"},
    {"attention": "sdpa", "seq": 2048},
    {"ac": True, "seq": 8192},
    {"ac": True, "draft_memory": "plain"},
    {"precision": "mixed", "micro_batch": 2},
    {"precision": "fp32-autocast", "ttt": 3},
    {"precision": "bf16", "optimizer": "adamw-8bit"},
    {"optimizer": "adamw-8bit"},  # bf16-master a parameter at a time, each step's 8-bit buffers
    {"optimizer_per_param": False},  # every grad copy at once
    {"optimizer_per_param": False, "optimizer": "adamw-8bit"},
    {"offload": "optimizer"},
    {"model": "gpt-oss-20b", "seq": 2048},  # MoE target with eager attention (sinks)
    {"model": "gemma-2-9b", "seq": 2048, "ttt": 2},  # eager attention, soft-capped logits
    {"model": "llama-3.1-8b", "seq": 16384},
    {"global_batch": 3, "seq": 1024},  # three micro-steps: grads carried between them
    {"project_embedding_once": False},  # each step projects its own embedding
    {"ttt": 2, "seq": 1024},  # the embedding projected once over the fewest steps it runs for
    {"recompute_mlp": True, "model": "llama-3.1-8b", "seq": 1024},  # grads outweigh activations
]


@pytest.mark.parametrize("kw", CASES, ids=case_ids(CASES))
def test_live_bytes_at_each_phase_peak_are_the_estimators_phase_sum(kw):
    j = job(**kw)
    est, built = estimate(j), step_events.build(j)
    grads = draft_state(j).grads()  # every gradient (the step a parameter at a time holds fewer)
    for label, live in built.live_peaks().items():
        assert_peak_is_phase_sum(label, live, phase_total(est, label), grads)


def test_every_allocation_is_freed_or_persists_as_the_trainers_state():
    """After the steady step: the checkpoint phase's bytes (weights, params, optimizer state)."""
    j = job(precision="mixed")
    assert live_after(step_events.build(j)) == estimate(j).phase_allocated("checkpoint")


def sizes_named(j, name: str) -> list[int]:
    built = step_events.build(j)
    return [e.size for e in built.events if e.op == "alloc" and built.names[e.key] == name]


def test_draft_parameter_tensors_by_hand():
    # llama-3.2-1b's draft: h 2048, I 8192, 32 heads of 64, 8 KV heads, Vd 32000, fc reads 3 x 2048
    params = dict(step_events.draft_parameters(job()))
    assert params["fc"] == 3 * 2048 * 2048 == 12_582_912
    assert params["q_proj"] == 4096 * 2048 == 8_388_608  # attention reads 2h = 4096
    assert params["k_proj"] == params["v_proj"] == 4096 * 512 == 2_097_152
    assert params["o_proj"] == 2048 * 2048
    assert params["gate_proj"] == params["up_proj"] == params["down_proj"] == 2048 * 8192 == 16_777_216
    assert params["lm_head"] == 32000 * 2048 == 65_536_000
    assert sum(params.values()) == job().draft.trainable_params()


def test_saved_tensor_sizes_by_hand():
    j = job()  # B 1, S 4096, T 4096 tokens, 7 TTT steps
    # flex: each step's keys cover steps 0..k: 2 B x 8 KV heads x 64 x 4096 tokens x (k + 1)
    assert sizes_named(job(attention="flex"), "keys of steps 0..k")[:7] == [4_194_304 * (k + 1) for k in range(7)]
    assert set(sizes_named(j, "gate")) == {2 * 8192 * 4096}  # [T, I] bf16, 64 MiB
    assert set(sizes_named(j, "logsumexp")) == {4 * 32 * 4096}  # fp32 [B, H, S]
    # teacher [B, S + L, Vd]: the target's bf16 logits over the draft vocab and, per position, their
    # fp32 log-sum-exp and int32 argmax (fused norms); fp32 probabilities without
    assert sizes_named(j, "teacher [B, S+L, Vd]") == [(2 * 32000 + 4 + 4) * 4103] * 2 == [262_624_824] * 2
    kept = job(recompute_norms=False)
    assert sizes_named(kept, "teacher [B, S+L, Vd]") == [4 * 4103 * 32000] * 2 == [525_184_000] * 2
    # gradients made in backward, the head scores 256 MiB / (4 B x 32000) = 2097 rows at a time:
    # bf16 [2097, 32000], then the 4096 - 2097 = 1999 rows left
    in_backward = job(head_grad_in_forward=False)
    assert sizes_named(in_backward, "head chunk logits")[:2] == [2 * 32000 * 2097, 2 * 32000 * 1999] \
        == [134_208_000, 127_936_000]
    assert sizes_named(in_backward, "grad of layer output (made in forward)") == []
    # made in forward (the default), 512 MiB / (2 B x 32000) = 8388 rows, 8192 as a multiple of 256,
    # so all 4096 positions at once: bf16 [4096, 32000], the gradient written over them, beside three
    # [4096, 2048] bf16 tables (the final norm's output, the hidden's gradient before and after the norm)
    assert sizes_named(j, "head chunk logits (grad over them)")[:7] == [2 * 32000 * 4096] * 7 == [262_144_000] * 7
    for table in ("final-norm output", "hidden grad", "hidden grad through the norm"):
        assert sizes_named(j, f"head chunk {table}")[:7] == [2 * 4096 * 2048] * 7
    assert sizes_named(j, "head chunk logits") == sizes_named(j, "head chunk logits grad") == []
    # and each step keeps the hidden's gradient [T, h] bf16, 2 x 4096 x 2048; the head weight's
    # [Vd, h] bf16 is made once, by the first step
    assert sizes_named(j, "grad of layer output (made in forward)")[:7] == [2 * 4096 * 2048] * 7 == [16_777_216] * 7
    assert sizes_named(j, "grad of lm_head (summed in forward)") == [2 * 32000 * 2048] * 2  # step 1, steady


def test_embedding_projection_sizes_by_hand():
    """llama-3.2-1b's draft (h 2048; q 32 x 64 = 2048 columns, k and v 8 x 64 = 512 each), S 4096,
    7 steps: P over S + L - 1 = 4102 tokens, one tensor per projection, 2 x 2048 x 4102 =
    16,801,792 B for q and 2 x 512 x 4102 = 4,200,448 B for k and v (25,202,688 B in all), once per
    micro-step (two in the sequence: step 1 and steady state); its fp32 gradient G twice that, and
    G's bf16 copy at the last call as P; no step's embedding. Off, each step gathers its own [T, h]
    bf16 embedding, 2 x 2048 x 4096, and there is no P."""
    j = job()
    for name, columns in (("q", 2048), ("k", 512), ("v", 512)):
        assert sizes_named(j, f"embedding projection P ({name})") == [2 * columns * 4102] * 2
        assert sizes_named(j, f"embedding projection G ({name})") == [4 * columns * 4102] * 2
        assert sizes_named(j, f"G in bf16 ({name})") == [2 * columns * 4102] * 2
    assert 2 * 2048 * 4102 + 2 * (2 * 512 * 4102) == 16_801_792 + 2 * 4_200_448 == 25_202_688
    assert sizes_named(j, "embedding") == []
    per_step = job(project_embedding_once=False)
    assert sizes_named(per_step, "embedding") == [2 * 2048 * 4096] * 14 == [16_777_216] * 14
    assert all(sizes_named(per_step, f"embedding projection P ({name})") == [] for name in "qkv")


def test_the_last_qkv_backward_call_holds_the_estimators_instant():
    """At G's bf16 copies in the steady step's last q/k/v backward call (P gone, G beside its
    copies, v's the last made) the sequence holds what eagle3.embedding_finish counts beside the
    resident state and the aux states: every grad but fc's and the input norm's, the draft's
    tensors left, G and the copies.
    An instant that outweighs the others only where the grads outweigh a step's activations."""
    from fitplan.estimator import eagle3, target_terms
    from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
    from fitplan.estimator.timeline import merge, phase

    j = job()
    built = step_events.build(j)
    at = max(i for i, e in enumerate(built.events) if e.op == "alloc" and built.names[e.key] == "G in bf16 (v)")
    state = draft_state(j)
    resident = phase(target__weights=target_terms.resident_weights(j), draft__params=state.params(),
                     runtime__workspace=CUBLAS_WORKSPACE_BYTES, target__outputs=target_terms.aux_outputs_bytes(j))
    instant = merge(resident, eagle3.optimizer_state(state, steady=True), eagle3.embedding_finish(j, state))
    assert live_after(built, at + 1) == sum(instant.values())


def test_optimizer_state_by_hand():
    # bf16-master, whole masters: fp32 masters and moments made in step 1, an fp32 grad copy
    # during each step
    lm_head = 65_536_000
    j = job(split_master=False)
    assert sizes_named(j, "master lm_head") == [4 * lm_head]
    assert sizes_named(j, "exp_avg lm_head") == [4 * lm_head]
    assert sizes_named(j, "fp32 grad copy lm_head") == [4 * lm_head] * 2
    # split masters (the default): 16 low bits per element in step 1, no grad copy
    j = job()
    assert sizes_named(j, "master lm_head") == [2 * lm_head]
    assert sizes_named(j, "exp_avg lm_head") == [4 * lm_head]
    assert sizes_named(j, "fp32 grad copy lm_head") == []
    # torchao's 8-bit moments: uint8 codes and an fp32 scale per 256; a norm of 2048 elements is
    # under 4096 and keeps fp32 moments (of its fp32 master); each tensor's step dequantizes each
    # moment into an fp32 buffer of its own (4 B per element each; one per step, steps 1 and 2)
    j = job(optimizer="adamw-8bit")
    assert sizes_named(j, "exp_avg lm_head") == [lm_head, 4 * lm_head // 256] == [65_536_000, 1_024_000]
    assert sizes_named(j, "exp_avg norm") == [4 * 2048]
    assert sizes_named(j, "8-bit step fp32 exp_avg lm_head") == [4 * lm_head] * 2
    assert sizes_named(j, "8-bit step fp32 exp_avg_sq lm_head") == [4 * lm_head] * 2
    assert sizes_named(j, "8-bit step fp32 exp_avg norm") == []
    # optimizer offloaded: nothing of it on the GPU
    j = job(offload="optimizer")
    assert not any("master" in n or "exp_avg" in n for n in step_events.build(j).names.values())


def test_a_parameter_at_a_time_by_hand():
    """bf16-master steps the draft's parameters smallest first, each bf16 grad freed as its fp32
    copy is made (trainer/optim.py MasterWeightAdamW._step_each). llama-3.2-1b's draft holds
    N = 145,235,968 trained elements; at each copy 2R + 4n, highest at the lm_head, last
    (n = 65,536,000, R = n): 2n + 4n, where 2N + 4 x 2048 at the first norm is lower. Whole
    masters: split ones make no copy."""
    j = job(split_master=False)
    built = step_events.build(j)
    first, end = {label: (a, b) for label, a, b in built.phases}["steady.optimizer_step"]
    ops = [(e.op, built.names[e.key]) for e in built.events[first:end]]
    copied = [name.removeprefix("fp32 grad copy ") for op, name in ops if op == "alloc"]
    assert copied == ["input_layernorm", "hidden_norm", "post_attention_layernorm", "norm", "k_proj", "v_proj",
                      "o_proj", "q_proj", "fc", "gate_proj", "up_proj", "down_proj", "lm_head"]
    for (op, name), (next_op, next_name) in pairwise(ops):
        if op == "alloc":  # its grad goes next (made by the last TTT step's backward, or the summed buffer)
            assert next_op == "free" and next_name.startswith(f"grad of {name.removeprefix('fp32 grad copy ')}")
    step = estimate(j).phases["optimizer_step"]
    assert (step["draft.grads"], step["optimizer.grad_copy"]) == (2 * 65_536_000, 4 * 65_536_000)
    assert sum(n for _, n in step_events.draft_parameters(j)) == 145_235_968


def test_gpt_oss_eager_scores_peak_at_three_copies():
    """q k^T scaled and masked [B, H, S, S], then with a sink column [B, H, S, S+1]: the masked
    scores, the max-subtracted copy and the softmax are live together."""
    j = resolve(RunSpec(model="gpt-oss-20b", gpus="1xH200", seq=1024))
    t = step_events.Trace()
    before = t.live
    peak = 0
    step_events.eager_scores(t, j)
    sizes: dict = {}
    for event in t.events:
        if event.op == "alloc":
            sizes[event.key] = event.size
            peak = max(peak, sum(sizes.values()))
        else:
            del sizes[event.key]
    square, wide = 2 * 64 * 1024 * 1024, 2 * 64 * 1024 * 1025  # 64 heads, bf16
    assert peak == square + 2 * wide
    assert t.live == before  # all freed


def test_loop_chunks():
    assert loop_chunks(4096, 2097) == [2097, 1999]
    assert loop_chunks(4194, 2097) == [2097]
    assert loop_chunks(1000, 2097) == [1000]


def test_written_layers_skip_pairs_of_like_layers():
    assert step_events.written_layers(32, (1, 15, 28)) == [0, 1, 2, 3, 14, 15, 16, 17, 28, 29, 30, 31]
    assert step_events.written_layers(7, (0, 3, 6)) == list(range(7))


@pytest.mark.parametrize("kw", [{"model": "llama-3.1-8b", "seq": 8192}, {"model": "gpt-oss-20b", "seq": 2048},
                                {"model": "gemma-3-12b", "draft_memory": "plain"}])
def test_skipping_like_layers_changes_nothing_the_allocator_does(kw, monkeypatch):
    j = job(**kw)

    def summary():
        s = replay(step_events.build(j).events, Allocator(replayed.capacity_bytes(j)))
        return s.peak_reserved, s.num_alloc_retries, [(action, size) for _, action, size, _ in s.segment_log]

    skipped = summary()
    monkeypatch.setattr(step_events, "written_layers", lambda layers, aux: list(range(layers)))
    assert summary() == skipped


def test_only_fitplans_trainer_on_one_gpu_is_replayed():
    assert estimate(job()).replay is not None
    for kw in ({"gpus": "2xH200"}, {"runtime": "specforge"}, {"attention": "eager"}):
        j = job(**kw)
        assert step_events.unsupported(j) and estimate(j).replay is None


def test_the_estimate_takes_its_device_level_from_the_replay():
    est = estimate(job())
    r = est.replay
    assert est.peak_reserved_bytes == r.peak_reserved_bytes + est.outside_allocator_bytes
    assert est.unconstrained_peak_bytes == est.peak_reserved_bytes  # no retry: the same
    assert est.verdict == Verdict.FITS and est.to_json()["allocator_replay"]["num_ooms"] == 0


def test_the_split_attention_keeps_each_steps_keys_once_by_hand():
    """trainer/ttt_attention.py at S 4096 (its default there): no concatenation is made, and each
    step's backward makes one key and one value gradient per step it read, [B, Hkv, S, d] bf16 =
    2 x 8 x 4096 x 64 = 4 MiB each: step k's causal kernel one pair, its diagonal k pairs, so
    0 + 1 + ... + 6 = 21 diagonal pairs per backward (two backwards: step 1 and steady)."""
    j = job()
    assert j.spec.attention_impl == "split"
    assert sizes_named(j, "keys of steps 0..k") == []
    assert sizes_named(j, "grad of a diagonal key") == [4_194_304] * 21 * 2
    assert sizes_named(j, "grad of step 0's key") == [4_194_304] * 7 * 2


def test_a_device_too_small_is_an_oom_with_what_the_step_needs():
    j = job(model="llama-3.1-8b", seq=131072, micro_batch=2)  # far beyond 141 GB
    est = estimate(j)
    assert est.replay.num_ooms > 0 and est.verdict == Verdict.OOM
    assert est.replay.needed_reserved_bytes > replayed.capacity_bytes(j)
    assert est.peak_reserved_bytes == est.replay.needed_reserved_bytes + est.outside_allocator_bytes
    assert est.headroom_bytes < 0


def test_retries_that_end_in_a_fit_are_at_risk():
    # a step whose cached blocks, freed on a tight device, serve the request that failed
    j = job(model="llama-3.1-8b", seq=16384, recompute_norms=False)
    needed = replayed.replay_step(j).peak_reserved
    # a device that holds the step only once the allocator gives its cache back
    tight = next(r for r in (replayed.replay_step(j, capacity=needed - n * 32 * MIB) for n in range(1, 64))
                 if r.num_alloc_retries)
    assert tight.num_ooms == 0 and tight.peak_reserved < needed
    est = replace(estimate(j), replay=replace(estimate(j).replay, num_alloc_retries=tight.num_alloc_retries))
    assert est.verdict == Verdict.AT_RISK and not est.fits


@pytest.mark.parametrize("kw", [{}, {"expandable_segments": True, "model": "llama-3.1-8b", "seq": 16384},
                                {"model": "llama-3.1-8b", "seq": 65536, "micro_batch": 2}])
def test_the_estimates_shortcut_agrees_with_the_whole_replay(kw):
    """allocator_replay replays with room first and on the device only when that is too small,
    stopping at the first failure; replay_step always replays the whole step on the device."""
    j = job(**kw)
    fast, whole = replayed.allocator_replay(j), replayed.replay_step(j)
    assert bool(fast.num_ooms) == bool(whole.num_ooms)
    if not whole.num_ooms:
        assert (fast.peak_reserved_bytes, fast.num_alloc_retries) == (whole.peak_reserved, whole.num_alloc_retries)


# ------------------------------------------------------------------ against the GPU


def test_lean_reports_device_level():
    """The committed lean reports (tests/data/gpu/lean, knobs; H200): every one within -3% / +6% at the
    device level, median within 3% (issue 16's goal). Eleven of the first seventeen (the targets cut to a
    few layers, llama-3.1-8b s2048 with its embedding shared and copied, and the four llama-3.1-8b runs
    with recompute_mlp or the optimizer a parameter at a time) were measured after the model was
    written and never tuned on. llama-3.2-1b's over-prediction is the estimator's allocated bytes,
    1-2% over, plus reserve the model keeps for the head's chunks. deepseek-v3's latent attention is
    not replayed. The llama-3.1-8b 8-bit run was 4.7% under until a recording of the same job
    (tests/data/gpu/trace/eightbit/) showed torchao's step making one fp32 buffer per moment, not
    one of twice the size: now 1.0% under. The five runs with the head's gradients made in forward
    (head_grad_in_forward, llama-3.1-8b s2048, s8192, s4096 in two micro-steps, s16384 with
    recompute_mlp, and llama-3.2-1b s4096) were measured before the estimator's terms for it were
    written: -1.0% to +1.0%, and -2.9% at s8192. The two on the split attention (llama-3.1-8b s8192 and
    s16384, its default there) were measured after its terms were written: -1.2% each. The two with
    split masters (llama-3.1-8b s2048 and s8192, split_masterauto) were measured after theirs were
    written: -0.6% each. The one with activation checkpointing (llama-3.1-8b s8192, actrue), measured
    once its steps were recomputed whole, with no term written for it: -1.8%. llama-3.1-8b s8192 with
the trainer's defaults, measured once the teacher was made by its one-pass kernel, after the
estimator's teacher term was changed for it."""
    rows = [r for r in replay_table.report_rows("lean", GPU_DATA) if r.replayed is not None]
    assert len(rows) == 28
    errors = {r.name: r.device_error(r.replayed) for r in rows}
    assert all(-3.0 <= e <= 6.0 for e in errors.values()), errors
    assert statistics.median(abs(e) for e in errors.values()) <= 3.0
    assert all(r.replayed.verdict == Verdict.FITS for r in rows)  # every one ran


def test_plain_reports_device_level():
    rows = [r for r in replay_table.report_rows("plain", GPU_DATA) if r.replayed is not None]
    assert len(rows) == 5
    assert all(abs(r.device_error(r.replayed)) <= 3.0 for r in rows), [r.device_error(r.replayed) for r in rows]


def test_one_gpu_matrix_rows_verdicts():
    """Never `fits` for a row that OOMed; the near-limit rows' outcomes (gpt-oss-20b b4: s5376 ran,
    s6400 and above OOMed; llama-3.1-8b b2 on an H100: s8448 and s9984 ran, s11008 OOMed)."""
    rows = [r for r in replay_table.matrix_rows(GPU_DATA) if r.replayed is not None]
    for r in rows:
        if r.outcome == "oom":
            assert r.replayed.verdict == Verdict.OOM, r.name
        elif "expandable" not in r.name:  # at 4% under the limit the model needed one retry
            assert r.replayed.verdict == Verdict.FITS, r.name
        if r.meas_device:
            assert -3.0 <= r.device_error(r.replayed) <= 6.0, (r.name, r.device_error(r.replayed))
