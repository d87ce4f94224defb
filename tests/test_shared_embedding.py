"""The draft's frozen embedding is the target's own tensor where the target holds it whole
(RunSpec.share_embedding, layout.shares_target_embedding): one [V, h] less, in the trainer and
in the estimate alike."""

from __future__ import annotations

import json

import pytest

from fitplan.config import RunSpec
from fitplan.estimator import estimate
from fitplan.layout import resolve, shares_target_embedding

torch = pytest.importorskip("torch")

from trainer.loop import run  # noqa: E402
from trainer.options import TrainOptions  # noqa: E402

from test_trainer import DRAFT, TARGET  # noqa: E402  (pytest puts tests/ on the path)

LLAMA_8B = dict(model="llama-3.1-8b", gpus="1xH200", seq=4096)


def job(**changes):
    return resolve(RunSpec(**{**LLAMA_8B, **changes}))


@pytest.mark.parametrize("changes,shared", [
    ({}, True),
    ({"share_embedding": False}, False),
    ({"gpus": "2xH200", "tp": 2}, False),  # the target's embedding is split over the TP ranks
    ({"gpus": "2xH200", "tp": 1}, True),  # data parallel: each rank holds the whole target
    ({"offline": True}, False),  # stored features: no target loaded, the draft keeps its own
    ({"runtime": "specforge"}, False),  # SpecForge's draft keeps a copy
])
def test_which_jobs_share(changes, shared):
    assert shares_target_embedding(job(**changes)) is shared


def test_sharing_saves_one_embedding_in_the_estimate():
    # llama-3.1-8b: V = 128256, h = 4096, bf16: 128256 * 4096 * 2 = 1,050,673,152 bytes
    embedding = 128256 * 4096 * 2
    shared, copied = estimate(job()), estimate(job(share_embedding=False))
    for phase, components in copied.phases.items():
        assert components["draft.params"] - shared.phases[phase]["draft.params"] == embedding, phase
    assert copied.peak_allocated_bytes - shared.peak_allocated_bytes == embedding


def test_stored_reports_predate_the_key():
    from fitplan.records import stored_config

    assert stored_config({"model": "llama-3.1-8b"})["share_embedding"] is False
    assert stored_config({"model": "llama-3.1-8b", "share_embedding": True})["share_embedding"] is True


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    (d / "target.json").write_text(json.dumps(TARGET))
    (d / "draft.json").write_text(json.dumps(DRAFT))
    return str(d / "target.json"), str(d / "draft.json")


def train(configs, output, share: bool):
    target, draft = configs
    spec = RunSpec(model=target, draft=draft, seq=32, micro_batch=1, ttt=2, tp=1, attention="eager",
                   share_embedding=share)
    built = {}
    from trainer import loop

    build = loop.build

    def keep(*args, **kwargs):
        built["run"] = build(*args, **kwargs)
        return built["run"]

    loop.build = keep
    try:
        report = run(TrainOptions(spec=spec, output=output, steps=2, random_weights=True, synthetic_data=True,
                                  device="cpu"))
    finally:
        loop.build = build
    return report, built["run"]


def test_the_trainer_shares_the_tensor_and_trains_as_with_a_copy(configs, tmp_path):
    shared_report, shared = train(configs, tmp_path / "shared", True)
    copied_report, copied = train(configs, tmp_path / "copied", False)
    target_weight = shared.target.model.get_input_embeddings().weight
    assert shared.draft.embed_tokens.weight.data_ptr() == target_weight.data_ptr()
    assert not shared.draft.embed_tokens.weight.requires_grad
    assert copied.draft.embed_tokens.weight.data_ptr() != copied.target.model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(copied.draft.embed_tokens.weight, copied.target.model.get_input_embeddings().weight)
    # the same seed draws the same trained weights either way: equal losses
    assert [s["loss"] for s in shared_report["steps"]] == [s["loss"] for s in copied_report["steps"]]
    # the checkpoint holds the embedding either way (engines load it from the draft's file)
    from safetensors.torch import load_file

    for report_dir in (tmp_path / "shared", tmp_path / "copied"):
        saved = load_file(next(report_dir.glob("step-*/model.safetensors")))
        assert torch.equal(saved["embed_tokens.weight"], target_weight.detach().cpu())
