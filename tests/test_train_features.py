"""`fitplan train --hidden-states DIR`: the Eagle3 draft trained from SpecForge's offline features.

The features are written here by trainer.feature_writer from the tiny random target that
`--random-weights` builds, in SpecForge's layout (DIR/rows_0-2000/data_<i>.ckpt, a dict of
input_ids [n], loss_mask [n], hidden_state [1, n, h], aux_hidden_state [1, n, 3h]; read off
scripts/prepare_hidden_states.py and specforge/data/preprocessing.py OfflineEagle3Dataset).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from fitplan.cli import app  # noqa: E402
from fitplan.config import RunSpec  # noqa: E402
from fitplan.estimator import estimate_spec  # noqa: E402
from fitplan.layout import resolve  # noqa: E402
import test_trainer  # noqa: E402
from test_trainer import DRAFT, TARGET  # noqa: E402
from trainer import data, features, loop  # noqa: E402
from trainer.feature_writer import write_random_target_features  # noqa: E402
from trainer.loop import run  # noqa: E402
from trainer.options import TrainOptions  # noqa: E402

H, V, SEQ = TARGET["hidden_size"], TARGET["vocab_size"], 32
AUX = (0, 2, 3)  # the tiny target's default aux layers (4 layers: 1, n/2-1, n-4 made distinct)
SYNTHETIC = 64  # loop.VOCAB_SAMPLES_SYNTHETIC: the online run counts its draft vocab over these
configs = test_trainer.configs  # the fixture: the tiny target's and draft's config files


@pytest.fixture(scope="module")
def synthetic_dir(configs, tmp_path_factory) -> Path:
    """The samples the online --synthetic-data run takes, as features of the same random target."""
    d = tmp_path_factory.mktemp("features") / "synthetic"
    write_random_target_features(d, configs[0], AUX, [data.synthetic_sample(i, SEQ, V, 0) for i in range(SYNTHETIC)])
    return d


def counting_samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four sequences counting upwards: a learnable next-token pattern, the first tokens unmasked."""
    samples = []
    for start in range(4):
        mask = torch.ones(28, dtype=torch.bool)
        mask[:4] = False
        samples.append((torch.arange(100 + start, 128 + start), mask))
    return samples


def train_args(configs, out: Path, *extra: str) -> list[str]:
    target, draft = configs
    return ["train", "--model", target, "--draft", draft, "--seq", str(SEQ), "--micro-batch", "2", "--ttt", "3",
            "--attention", "sdpa", "--random-weights", "--device", "cpu", "--output", str(out), "--json", *extra]


def refused(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------ the format


def test_the_writer_lays_files_out_as_specforge_does(synthetic_dir):
    first = synthetic_dir / "rows_0-2000" / "data_0.ckpt"
    assert len(list((synthetic_dir / "rows_0-2000").glob("data_*.ckpt"))) == SYNTHETIC
    record = torch.load(first, weights_only=True)
    assert set(record) == {"input_ids", "loss_mask", "hidden_state", "aux_hidden_state"}
    assert record["input_ids"].shape == (SEQ,) and record["input_ids"].dtype == torch.int64
    assert record["loss_mask"].shape == (SEQ,)
    assert record["hidden_state"].shape == (1, SEQ, H) and record["hidden_state"].dtype == torch.bfloat16
    assert record["aux_hidden_state"].shape == (1, SEQ, 3 * H) and record["aux_hidden_state"].dtype == torch.bfloat16
    assert torch.equal(record["input_ids"], data.synthetic_sample(0, SEQ, V, 0)[0])


def test_compressed_files_are_read_too(configs, tmp_path):
    d = tmp_path / "gz"
    write_random_target_features(d, configs[0], AUX, counting_samples(), compress=True)
    assert sorted(p.name for p in d.rglob("*.ckpt.gz")) == [f"data_{i}.ckpt.gz" for i in range(4)]
    job = resolve(RunSpec(model=configs[0], draft=configs[1], seq=SEQ, micro_batch=2, offline=True))
    prepared = features.prepare(d, job)
    assert prepared.lengths == (28, 28, 28, 28)
    assert features.load_sample(prepared.files[0], prepared.layout).hidden.shape == (28, H)


# ------------------------------------------------------------------ training


def test_features_teach_what_the_live_target_teaches(configs, synthetic_dir, tmp_path):
    # Step 1 takes samples 0 and 1 in both runs (the features' first epoch starts with its
    # longest files: all are SEQ long, so the first two) and both count the draft vocab over the
    # same 64 samples: the same teacher gives the same loss, to the last bit on one machine.
    def options(out: str, **source) -> TrainOptions:
        spec = RunSpec(model=configs[0], draft=configs[1], seq=SEQ, micro_batch=2, ttt=3, tp=1, attention="sdpa",
                       offline="hidden_states" in source)
        return TrainOptions(spec=spec, output=tmp_path / out, steps=1, random_weights=True, device="cpu", **source)

    live = run(options("live", synthetic_data=True))
    stored = run(options("stored", hidden_states=synthetic_dir))
    assert stored["steps"][0]["loss"] == pytest.approx(live["steps"][0]["loss"], rel=1e-6)
    assert stored["config"]["offline"] is True


def test_the_loss_falls_and_a_report_is_written(configs, tmp_path):
    d = tmp_path / "counting"
    write_random_target_features(d, configs[0], AUX, counting_samples())
    out = tmp_path / "run"
    args = train_args(configs, out, "--hidden-states", str(d), "--steps", "8", "--lr", "1e-2", "--attention", "eager")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    losses = [s["loss"] for s in report["steps"]]
    # the four samples come round every two steps: a draft that learns halves its loss
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses
    assert report["steps"][-1]["acc"][0] > report["steps"][0]["acc"][0]
    assert (out / "step-000008" / "model.safetensors").is_file()
    assert report["prediction"]["components"].get("target.activations") is None


def test_the_draft_vocab_is_counted_from_the_stored_tokens_and_cached(configs, tmp_path):
    d = tmp_path / "counting"
    write_random_target_features(d, configs[0], AUX, counting_samples())
    job = resolve(RunSpec(model=configs[0], draft=configs[1], seq=SEQ, micro_batch=2, offline=True))
    # loss tokens: 104..127 (start 0) to 107..130 (start 3); 107..127 four times, 104..106 and
    # 128..130 fewer; the draft vocab (128) takes all 27 and fills up with the lowest unseen ids
    seen = set(range(104, 131))
    expected = sorted(seen | set(sorted(set(range(V)) - seen)[: DRAFT["draft_vocab_size"] - len(seen)]))
    prepared = features.prepare(d, job)
    assert prepared.draft_ids.tolist() == expected
    features._PREPARED.clear()  # a new process: the index beside the directory answers
    cached = list(tmp_path.glob("counting.fitplan-index-*.pt"))
    assert len(cached) == 1
    assert features.prepare(d, job).draft_ids.tolist() == expected


# ------------------------------------------------------------------ the estimate


def test_the_estimate_holds_the_lm_head_not_the_target():
    # Llama-3.1-8B: vocab 128256, hidden 4096 (its config.json); its safetensors index says
    # total_size 16,060,522,496 B (8,030,261,248 bf16 parameters). The researched draft's vocab
    # is 32000; B 1, S 4096, TTT 7.
    V8, h, Vd, B, S, L = 128256, 4096, 32000, 1, 4096, 7
    head = 2 * V8 * h  # 1,050,673,152 B
    offline = estimate_spec(RunSpec(model="llama-3.1-8b", gpus="1xH200", seq=S, offline=True))
    # online with the draft's own copy of the embedding, as offline keeps one (no target to share)
    online = estimate_spec(RunSpec(model="llama-3.1-8b", gpus="1xH200", seq=S, tp=1, share_embedding=False))
    forward = offline.phases["target_forward"]
    assert forward["target.weights"] == head
    assert "target.activations" not in forward
    # building the teacher: aux [B, S, 3h] bf16, the logits [B, S, V] bf16 and the teacher
    # [B, S+L, Vd]: with fused norms (the default) the target's bf16 logits and per position their
    # fp32 log-sum-exp and int32 argmax, written in one pass (trainer/teacher_kernel.py);
    # without, fp32 probabilities, and one gathered chunk of 1024 positions [B, 1024, Vd] bf16
    assert forward["target.outputs"] == 2 * B * S * 3 * h
    assert forward["logits.target"] == 2 * B * S * V8
    assert forward["logits.teacher"] == (2 * Vd + 4 + 4) * B * (S + L)
    kept = estimate_spec(RunSpec(model="llama-3.1-8b", gpus="1xH200", seq=S, offline=True, recompute_norms=False))
    assert kept.phases["target_forward"]["logits.teacher"] == 4 * B * (S + L) * Vd
    assert kept.phases["target_forward"]["logits.target"] == 2 * B * S * V8 + 2 * B * 1024 * Vd
    # loading: the lm_head and the embedding, read while the draft copies it
    assert offline.phases["load"]["target.weights"] == 2 * head
    assert online.phases["target_forward"]["target.weights"] == 16_060_522_496
    # the draft's phases differ by the weights alone
    for name in ("draft_forward", "backward", "optimizer_step"):
        assert sum(online.phases[name].values()) - sum(offline.phases[name].values()) == 16_060_522_496 - head
    assert offline.largest_allocation_bytes == 2 * B * S * V8  # the teacher's logits; the lm_head is as large


def test_a_tied_target_stages_no_second_embedding():
    # Llama-3.2-1B ties its lm_head to the embedding: vocab 128256, hidden 2048
    est = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="1xH200", seq=2048, offline=True))
    assert est.phases["load"]["target.weights"] == 2 * 128256 * 2048


def test_offline_estimates_and_rules_for_the_fitplan_runtime():
    ok = CliRunner().invoke(app, ["estimate", "--model", "llama-3.1-70b", "--gpus", "1xH100", "--offline"])
    assert ok.exit_code == 0, ok.output
    assert "tp 1" in ok.output  # no target to split: a 70B target's features train on one GPU
    assert "accepted: 1" in refused(["estimate", "--model", "llama-3.1-8b", "--gpus", "2xH100", "--tp", "2",
                                     "--offline"])
    assert "sft has no frozen target" in refused(["estimate", "--model", "llama-3.1-8b", "--workload", "sft",
                                                  "--offline"])


# ------------------------------------------------------------------ bad input


def hand_written(d: Path, name: str = "data_0.ckpt", n: int = 8, hidden: int = H, aux: int = 3 * H,
                 top_id: int = V - 1, drop: str | None = None) -> Path:
    record = {"input_ids": torch.linspace(0, top_id, n).long(), "loss_mask": torch.ones(n, dtype=torch.long),
              "hidden_state": torch.zeros(1, n, hidden, dtype=torch.bfloat16),
              "aux_hidden_state": torch.zeros(1, n, aux, dtype=torch.bfloat16)}
    if drop:
        record[drop] = None  # as SpecForge's writer stores a state it did not capture
    path = d / "rows_0-2000" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)
    return path


def truncated(d: Path, index: int) -> Path:
    """data_<index>.ckpt cut off halfway through, as a full disk or a killed writer leaves it."""
    whole = hand_written(d, name=f"data_{index}.ckpt")
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return whole


def truncated_after_good_ones(d: Path) -> None:
    for i in range(3):
        hand_written(d, name=f"data_{i}.ckpt")
    truncated(d, 7)


BAD = {
    "no such directory": (lambda d: None, "no such directory"),
    "no feature files": (lambda d: d.mkdir(), "no feature files"),
    "another hidden size": (lambda d: hand_written(d, hidden=2 * H), f"hidden_state is {2 * H} wide"),
    "another aux width": (lambda d: hand_written(d, aux=2 * H), f"aux_hidden_state is {2 * H} wide"),
    "another vocabulary": (lambda d: hand_written(d, top_id=4 * V), f"token id {4 * V} is outside"),
    "no aux states": (lambda d: hand_written(d, drop="aux_hidden_state"), "no aux_hidden_state tensor"),
    "truncated first file": (lambda d: truncated(d, 0), "data_0.ckpt: not a readable feature file, truncated"),
    "truncated later file": (truncated_after_good_ones, "data_7.ckpt: not a readable feature file, truncated"),
    "too few files": (lambda d: hand_written(d), "1 feature files, fewer than micro_batch 2"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_features_directory_is_one_line_and_nothing_is_written(configs, tmp_path, case):
    make, words = BAD[case]
    d = tmp_path / "features"
    make(d)
    out = tmp_path / "run"
    line = refused(train_args(configs, out, "--hidden-states", str(d)))
    assert words in line, line
    assert not out.exists()
    kept = tmp_path / "kept"  # an output folder that holds a run already is left as it was
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    refused(train_args(configs, kept, "--hidden-states", str(d)))
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_draft_of_another_vocabulary_is_refused(configs, synthetic_dir, tmp_path):
    draft = tmp_path / "draft.json"
    draft.write_text(json.dumps({**DRAFT, "vocab_size": 2 * V}))
    args = train_args(configs, tmp_path / "run", "--hidden-states", str(synthetic_dir))
    args[args.index("--draft") + 1] = str(draft)
    assert f"has vocab_size {2 * V} but" in refused(args)
    assert not (tmp_path / "run").exists()


def test_one_source_of_samples_and_offline_needs_features(configs, synthetic_dir, tmp_path):
    both = refused(train_args(configs, tmp_path / "a", "--hidden-states", str(synthetic_dir), "--synthetic-data"))
    assert "give one source of samples" in both
    assert "--hidden-states DIR" in refused(train_args(configs, tmp_path / "b", "--synthetic-data", "--offline"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_file_corrupted_mid_run_stops_it_keeping_the_checkpoints(configs, tmp_path, monkeypatch):
    d = tmp_path / "features"
    shutil.copytree(configs_features(configs, tmp_path), d)
    real_save = loop.checkpoint.save

    def save_then_corrupt(*args, **kwargs):  # after step 1's checkpoint every file is cut in half
        saved = real_save(*args, **kwargs)
        for path in d.rglob("*.ckpt"):
            path.write_bytes(path.read_bytes()[:100])
        return saved

    monkeypatch.setattr(loop.checkpoint, "save", save_then_corrupt)
    out = tmp_path / "run"
    line = refused(train_args(configs, out, "--hidden-states", str(d), "--steps", "3", "--save-every", "1"))
    assert "not a readable feature file" in line and str(d) in line and "the run stopped" in line
    assert (out / "step-000001" / "model.safetensors").is_file()
    assert [s["step"] for s in json.loads((out / "report.json").read_text())["steps"]] == [1]


def configs_features(configs, tmp_path) -> Path:
    d = tmp_path / "written"
    write_random_target_features(d, configs[0], AUX, counting_samples())
    return d
