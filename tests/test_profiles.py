"""Profiles: every shipped model parses, names resolve, GPUs parse, user files work."""

import json

import pytest

from fitplan.errors import FitplanError
from fitplan.profiles import (
    _json_files, derive_draft, gpu_names, load_draft, load_model, model_names, parse_gpus,
)

GIB = 2**30


@pytest.mark.parametrize("name", model_names())
def test_every_model_profile_loads(name):
    m = load_model(name)
    assert m.hidden > 0 and m.layers > 0 and m.vocab > 0
    assert derive_draft(m).aux_layers  # an Eagle3 draft can be derived for each


def test_repo_id_resolves_to_profile():
    assert load_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert load_model("openai/gpt-oss-120b").name == "gpt-oss-120b"


def test_unknown_model_suggests_close_names():
    with pytest.raises(FitplanError, match="did you mean qwen3-8b"):
        load_model("qwen3-8")


def test_gpu_strings():
    c = parse_gpus("8xH100")
    assert (c.nodes, c.gpus_per_node, c.world) == (1, 8, 8)
    # H100 80GB as torch reports it: 79.18 GiB (docs/estimate.md)
    assert round(c.gpu.total_bytes / GIB, 2) == 79.18
    two = parse_gpus("2x8xH100")
    assert (two.nodes, two.world) == (2, 16)
    assert round(parse_gpus("1xH200").gpu.total_bytes / GIB, 2) == 139.80
    assert parse_gpus("4xA100-80GB").gpu.id == "A100-SXM-80GB"
    with pytest.raises(FitplanError, match="unknown GPU"):
        parse_gpus("8xH1O0")
    with pytest.raises(FitplanError, match="at least 1"):
        parse_gpus("0xH100")
    assert "H100-SXM-80GB" in gpu_names()


def test_auto_draft_uses_researched_profile():
    d = load_draft("auto", load_model("gpt-oss-120b"))
    assert d.name == "gpt-oss-120b" and d.aux_layers == (1, 17, 33)  # the config's eagle_aux layer ids
    assert d.intermediate == 17280


def test_gemma_ties_embeddings_by_default():
    # Gemma's HF config leaves tie_word_embeddings to the class default (True)
    assert load_model("gemma-2-9b").tie_embeddings


def test_user_profile_dir(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.json").write_text(json.dumps(
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}))
    monkeypatch.setenv("FITPLAN_PROFILES", str(tmp_path))
    m = load_model("tiny")
    assert (m.kv_heads, m.head_dim, m.intermediate) == (4, 16, 256)  # HF defaults: kv=heads, 4*h
    assert "tiny" in _json_files("models")
