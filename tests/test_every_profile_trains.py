"""Every model profile builds a transformers model, and every family trains a step on CPU.

The profiles are HF configs plus research fields (nulls, `*_effective`, notes, DeepSeek's `mla`
block, Gemma 3's flattened multimodal config): `trainer.target.hf_config` turns each into the
config `fitplan train --random-weights` builds. Here each one is built on the meta device and
counted against the estimator; then a scaled-down copy of one profile per model_type, with the
family's quirks kept, trains one step through `fitplan train` on the CPU.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from test_trainer import TARGET, configs  # noqa: E402,F401  (configs: the fixture writing the tiny draft.json)

from fitplan.profiles import load_model, load_model_config, model_names  # noqa: E402
from fitplan.shapes import count_params  # noqa: E402
from trainer.target import build_random, hf_config  # noqa: E402


def checkpoint_numel(model: torch.nn.Module) -> int:
    """Parameters (a tied embedding once) plus persistent buffers: the checkpoint's tensors.

    DeepSeek-V3's router e_score_correction_bias is a persistent buffer in transformers'
    DeepseekV3TopkRouter (58 MoE layers x 256 experts = 14,848 values), a stored tensor of the
    checkpoint and resident beside the weights: the estimator counts it, so this does too.
    """
    state = model.state_dict(keep_vars=True)
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in state)
    return sum(p.numel() for p in model.parameters()) + buffers


def in_use(model: torch.nn.Module, key: str):
    """The value of a config key as the built model uses it."""
    if key == "head_dim":  # Qwen2Config has no head_dim attribute: its attention works it out
        return model.model.layers[0].self_attn.head_dim
    if key == "tie_word_embeddings":
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return getattr(model.config, key)


@pytest.mark.parametrize("name", model_names())
def test_profile_builds_and_matches_the_estimators_parameter_count(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(name))
    assert checkpoint_numel(model) == count_params(load_model(name)).total
    # hf_config drops `X_effective` (the research's note of what HF uses for a null X): so it is
    _, raw, _ = load_model_config(name)
    for key, value in raw.items():
        base = key.removesuffix("_effective")
        if key.endswith("_effective") and raw.get(base) is None:
            assert in_use(model, base) == value, key
    if "sliding_window" in raw and raw["sliding_window"] is None:  # HF's "no window", not a default's 4096
        assert getattr(model.config, "sliding_window", None) is None


# ------------------------------------------------------------------ one step per family

# One profile per model_type (test_every_model_type_has_a_family checks that none is missing).
FAMILIES = {
    "llama": "llama-3.2-1b",  # tied embeddings, llama3 rope scaling
    "mistral": "mistral-7b-v0.3",  # head_dim null, sliding_window null (no window)
    "qwen2": "qwen2.5-7b",  # head_dim null, q/k/v biases, use_sliding_window false
    "qwen3": "qwen3-8b",  # q/k norms
    "qwen3_moe": "qwen3-30b-a3b",  # routed experts only
    "gemma2": "gemma-2-9b",  # logit soft-capping, alternating sliding window, tie_word_embeddings null
    "gemma3_text": "gemma-3-12b",  # flattened multimodal profile, 5:1 sliding layers, two rope bases
    "deepseek_v3": "deepseek-v3",  # MLA (the `mla` block), shared experts, leading dense layer, yarn
    "gpt_oss": "gpt-oss-20b",  # attention sinks, biased experts, MXFP4 config dropped
}

# Sizes of test_trainer's tiny target; the family's own fields (soft-capping, rope, biases, ...) stay.
SMALL = {k: TARGET[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim", "vocab_size")}
SMALL |= {
    "moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "experts_per_token": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "sliding_window": 16, "sliding_window_size": 16,  # under --seq 64, so the window masks something
}


def _small(key: str, value):
    base = key.removesuffix("_effective")
    return SMALL[base] if base in SMALL and isinstance(value, int) and not isinstance(value, bool) else value


def scaled_down(raw: dict) -> dict:
    """A small copy of a profile: same keys, nulls and nesting, small sizes, a layer of each type."""
    small = {key: _small(key, value) for key, value in raw.items()}
    if isinstance(raw.get("mla"), dict):  # DeepSeek's latent attention sizes (hf_config lifts them)
        small["mla"] = {key: _small(key, value) for key, value in raw["mla"].items()}
    # MHA stays MHA (DeepSeek's MLA needs it); GQA gets TARGET's 2 KV heads
    mha = raw["num_key_value_heads"] == raw["num_attention_heads"]
    small["num_key_value_heads"] = SMALL["num_attention_heads"] if mha else TARGET["num_key_value_heads"]
    layers = TARGET["num_hidden_layers"]
    types = raw.get("layer_types") or raw.get("layer_types_effective")
    if types and "full_attention" not in types[:layers]:
        layers = types.index("full_attention") + 1  # Gemma 3: five sliding layers, then a full one
    small["num_hidden_layers"] = layers
    for key in ("layer_types", "layer_types_effective"):
        if raw.get(key):
            small[key] = raw[key][:layers]
    if raw.get("max_window_layers"):
        small["max_window_layers"] = layers
    return small


def small_copy(name: str, tmp_path) -> str:
    """config.json path of a scaled-down copy of profile `name`."""
    _, raw, _ = load_model_config(name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(scaled_down(raw)))
    return str(path)


def test_every_model_type_has_a_family():
    assert {hf_config(name).model_type for name in model_names()} == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_scaled_down_family_member_trains_a_step(model_type, configs, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from fitplan.cli import app

    target = small_copy(FAMILIES[model_type], tmp_path)
    cfg = hf_config(target)
    assert (cfg.model_type, cfg.hidden_size, cfg.vocab_size) == (model_type, 64, 512)
    _, draft = configs
    result = CliRunner().invoke(app, [
        "train", "--model", target, "--draft", draft, "--random-weights", "--synthetic-data",
        "--device", "cpu", "--attention", "eager", "--seq", "64", "--tp", "1", "--steps", "1",
        "-o", str(tmp_path / "run"), "--json",
    ])
    assert result.exit_code == 0, result.output
    steps = json.loads(result.output)["steps"]
    assert [s["step"] for s in steps] == [1]
    assert math.isfinite(steps[0]["loss"]), steps


def test_random_weights_set_the_buffers_too(tmp_path):
    """to_empty leaves buffers as stale memory; build_random has the model's initializer set them."""
    cpu = torch.device("cpu")
    gemma = build_random(hf_config(small_copy("gemma-3-12b", tmp_path)), cpu).model
    assert gemma.embed_tokens.embed_scale.item() == 8.0  # sqrt(hidden 64)
    deepseek = build_random(hf_config(small_copy("deepseek-v3", tmp_path)), cpu).model
    biases = [layer.mlp.gate.e_score_correction_bias for layer in deepseek.layers[1:]]  # the MoE layers
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_an_hf_multimodal_config_gives_its_text_decoder_and_bad_ones_are_one_line_errors(tmp_path):
    from fitplan.errors import FitplanError

    text = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma3", "text_config": text, "vocab_size": 512,
                                "vision_config": {"model_type": "siglip_vision_model"}}))
    cfg = hf_config(str(path))
    assert (cfg.model_type, cfg.hidden_size, cfg.vocab_size, cfg.sliding_window) == ("gemma3_text", 64, 512, 16)
    for bad, message in [({"model_type": "no_such_model"}, "does not know model_type"),
                         ({"model_type": "llama", "tie_word_embeddings": "maybe"}, "rejects it as a llama config")]:
        path.write_text(json.dumps({**TARGET, **bad}))
        with pytest.raises(FitplanError, match=message) as err:
            hf_config(str(path))
        assert "\n" not in str(err.value)
