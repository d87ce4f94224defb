"""Tied embeddings (tie_word_embeddings: lm_head.weight *is* embed_tokens.weight) are one [V, h]
tensor, counted once in every phase.

The expected numbers are hand counts from the profile's shape (profiles/models/llama-3.2-3b.json)
times bytes per parameter, written out here; they are not read back from the estimator.
The draft's frozen embedding is the target's own tensor at tp 1 (share_embedding, the default):
a tied target then has one [V, h] on the GPU, serving as its embedding, its lm_head and the
draft's embedding. With share_embedding off, trainer/loop.py build_draft copies it into the
draft's own nn.Embedding: a second [V, h].
"""

from __future__ import annotations

import json

import pytest

from fitplan.config import RunSpec
from fitplan.estimator import estimate_spec
from fitplan.profiles import _json_files

# llama-3.2-3b, profiles/models/llama-3.2-3b.json
V, h, LAYERS, H, HKV, d, I = 128256, 3072, 28, 24, 8, 128, 8192
BF16, FP32 = 2, 4
CUBLAS_WORKSPACE = 32 * 2**20  # runtime.workspace, in every phase

EMBED = V * h  # 394,002,432: the [V, h] matrix
PER_LAYER = (
    h * (H + 2 * HKV) * d  # q, k, v: 15,728,640
    + H * d * h  # o: 9,437,184
    + 3 * h * I  # gate, up, down: 75,497,472
    + 2 * h  # input and post-attention RMSNorm
)
TARGET_TIED = EMBED + LAYERS * PER_LAYER + h  # embedding once (it is the lm_head too) + final norm
TARGET_UNTIED = TARGET_TIED + EMBED  # a separate lm_head [V, h]

# `--draft auto` for llama-3.2-3b (no researched draft): the target's attention and MLP widths,
# draft vocab 32000, fc over 3 target hidden states (docs/estimate.md, "eagle3 draft").
VD = 32000
DRAFT_TRAINABLE = (
    3 * h * h  # fc: 28,311,552
    + 2 * h * (H + 2 * HKV) * d + H * d * h  # attention over the 2h-wide input: 40,894,464
    + 3 * h * I  # MLP: 75,497,472
    + 4 * h  # input, hidden, post-attention and final norms
    + h * VD  # lm_head over the draft vocab: 98,304,000
)
DRAFT_FROZEN = EMBED  # the frozen copy of the target's embedding, bf16, with share_embedding off


def test_hand_counts_match_the_profile():
    assert TARGET_TIED == 3_212_749_824
    assert json.loads(_json_files("models")["llama-3.2-3b"].read_text())["params_computed_from_config"] == TARGET_TIED
    assert DRAFT_TRAINABLE == 243_019_776


def _untied_copy(tmp_path) -> str:
    """The same shape with tie_word_embeddings false, as a config.json path."""
    cfg = json.loads(_json_files("models")["llama-3.2-3b"].read_text())
    assert cfg["tie_word_embeddings"] is True
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return str(path)


def _totals(estimate) -> dict[str, int]:
    return {name: sum(components.values()) for name, components in estimate.phases.items()}


# ---------------------------------------------------------------- eagle3, bf16-master, 1xH100


def test_tied_target_load_counts_the_embedding_once_shared_with_the_draft():
    e = estimate_spec(RunSpec(model="llama-3.2-3b", gpus="1xH100", seq=2048))
    load = e.phases["load"]
    assert load["target.weights"] == BF16 * TARGET_TIED  # 6,425,499,648
    assert load["draft.params"] == BF16 * DRAFT_TRAINABLE  # 486,039,552
    assert sum(load.values()) == BF16 * TARGET_TIED + BF16 * DRAFT_TRAINABLE + CUBLAS_WORKSPACE
    assert sum(load.values()) == 6_945_093_632
    assert e.step1_phases["load"] == load  # the master and moments come with the first step


def test_tied_target_load_counts_the_embedding_once_plus_the_drafts_copy():
    e = estimate_spec(RunSpec(model="llama-3.2-3b", gpus="1xH100", seq=2048, share_embedding=False))
    load = e.phases["load"]
    assert load["target.weights"] == BF16 * TARGET_TIED  # 6,425,499,648
    assert load["draft.params"] == BF16 * (DRAFT_TRAINABLE + DRAFT_FROZEN)  # 1,274,044,416
    assert sum(load.values()) == BF16 * TARGET_TIED + BF16 * (DRAFT_TRAINABLE + DRAFT_FROZEN) + CUBLAS_WORKSPACE
    assert sum(load.values()) == 7_733_098_496


def test_tied_target_optimizer_and_checkpoint_by_hand():
    # whole masters, every grad copy at once (the step a parameter at a time and split masters are
    # by hand in tests/test_estimator.py)
    totals = _totals(estimate_spec(RunSpec(model="llama-3.2-3b", gpus="1xH100", seq=2048, share_embedding=False,
                                           optimizer_per_param=False, split_master=False)))
    load = BF16 * TARGET_TIED + BF16 * (DRAFT_TRAINABLE + DRAFT_FROZEN) + CUBLAS_WORKSPACE
    # bf16-master: fp32 master 4 + Adam moments 8 (steady), bf16 grads 2 and an fp32 grad copy 4 at the step
    master, moments = FP32 * DRAFT_TRAINABLE, 2 * FP32 * DRAFT_TRAINABLE
    assert totals["optimizer_step"] == load + BF16 * DRAFT_TRAINABLE + master + moments + FP32 * DRAFT_TRAINABLE
    assert totals["optimizer_step"] == 12_107_454_464
    assert totals["checkpoint"] == load + master + moments
    assert totals["checkpoint"] == 10_649_335_808


def test_untied_minus_tied_is_one_bf16_vocab_matrix_in_every_phase(tmp_path):
    spec = dict(gpus="1xH100", seq=2048)
    tied = estimate_spec(RunSpec(model="llama-3.2-3b", **spec))
    untied = estimate_spec(RunSpec(model=_untied_copy(tmp_path), **spec))
    assert untied.phases["load"]["target.weights"] == BF16 * TARGET_UNTIED
    assert untied.phases["load"]["target.weights"] - tied.phases["load"]["target.weights"] == BF16 * V * h
    for which in ("phases", "step1_phases"):
        t, u = _totals_of(tied, which), _totals_of(untied, which)
        assert set(t) == set(u)
        assert {name: u[name] - t[name] for name in t} == {name: BF16 * V * h for name in t}, which


def _totals_of(estimate, which: str) -> dict[str, int]:
    return {name: sum(c.values()) for name, c in getattr(estimate, which).items()}


# ---------------------------------------------------------------- sft: the whole model is trained


def test_sft_tied_embedding_is_one_trained_matrix(tmp_path):
    """sft trains the [V, h] once when tied: its params, grads, master and moments all differ by
    one V*h from the untied model (bf16-master: 2 + 2 + 4 + 8, the grad copy 4 at the step, every
    copy at once, whole masters: a parameter at a time the step holds one copy, by hand in
    tests/test_estimator.py)."""
    spec = dict(gpus="1xH100", seq=2048, workload="sft", optimizer_per_param=False, split_master=False)
    tied = estimate_spec(RunSpec(model="llama-3.2-3b", **spec))
    untied = estimate_spec(RunSpec(model=_untied_copy(tmp_path), **spec))
    assert tied.phases["load"]["model.params"] == BF16 * TARGET_TIED
    t, u = _totals(tied), _totals(untied)
    assert u["load"] - t["load"] == BF16 * EMBED
    assert u["optimizer_step"] - t["optimizer_step"] == (BF16 + BF16 + FP32 + 2 * FP32 + FP32) * EMBED
    assert u["checkpoint"] - t["checkpoint"] == (BF16 + FP32 + 2 * FP32) * EMBED
    assert u["forward"] - t["forward"] == (BF16 + FP32 + 2 * FP32) * EMBED  # steady: no grads (accum 1)


# ---------------------------------------------------------------- against the trainer (CPU)

TINY = dict(  # tests/test_trainer.py's target with a vocab large enough that [V, h] shows
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=4096,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.5,
)
TINY_DRAFT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=4096, draft_vocab_size=256)
STATE_PHASES = ("load", "optimizer_step", "checkpoint")


def _trainer_errors(tmp_path, tied: bool) -> dict[str, float]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from trainer.loop import run
    from trainer.options import TrainOptions

    (tmp_path / "target.json").write_text(json.dumps({**TINY, "tie_word_embeddings": tied}))
    (tmp_path / "draft.json").write_text(json.dumps(TINY_DRAFT))
    spec = RunSpec(model=str(tmp_path / "target.json"), draft=str(tmp_path / "draft.json"), seq=32, ttt=1, tp=1,
                   attention="eager")
    report = run(TrainOptions(spec=spec, output=tmp_path / "out", steps=2, random_weights=True,
                              synthetic_data=True, device="cpu"))
    measured = {**report["steps"][1]["phases"], "load": report["load"]["load"]}
    errors = {}
    for phase in STATE_PHASES:
        components = report["prediction"]["phase_components"][phase]
        predicted = sum(v for name, v in components.items() if name != "runtime.workspace")
        errors[phase] = (measured[phase]["allocated"] - predicted) / predicted
    return errors


def test_trainer_state_phases_match_untied(tmp_path):
    errors = _trainer_errors(tmp_path, tied=False)
    assert all(abs(e) <= 0.05 for e in errors.values()), errors


def test_trainer_state_phases_match_tied(tmp_path):
    errors = _trainer_errors(tmp_path, tied=True)
    assert all(abs(e) <= 0.05 for e in errors.values()), errors
