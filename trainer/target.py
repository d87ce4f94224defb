"""The frozen target: a transformers causal LM run under no_grad, with three layers tapped.

Forward hooks on the aux layers capture their outputs (the hidden states the draft reads);
the LM head's logits cover every position. Nothing here keeps a graph: the target is frozen.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch

from fitplan.errors import FitplanError
from fitplan.profiles import REQUIRED_MODEL_KEYS, load_model_config

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(g)) for g in WEIGHT_GLOBS)


# Research annotations in profiles/models/*.json, nothing transformers reads: sources, notes,
# stated parameter counts, checkpoint formats, and `X_effective` (the value transformers' default
# for a null or absent X gives; tests/test_every_profile_trains.py checks that it does).
_ANNOTATIONS = ("hf_repo", "source", "note", "mla")
_ANNOTATION_SUFFIXES = ("_note", "_effective", "_format")
# Nulls that are HF's own value, not a gap in the research: `"sliding_window": null` (no window)
# is what Mistral-7B-v0.3's config.json says; dropped, MistralConfig's default of 4096 would apply.
_NULL_IS_A_VALUE = ("sliding_window",)
# The HF config keys a profile's `mla` block records (DeepSeek multi-head latent attention).
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def hf_config(model_ref: str):
    """A transformers config for a profile name, config.json or model directory.

    A profile is an HF config plus research fields. Nulls are dropped, so transformers' default
    applies (_NULL_IS_A_VALUE excepted), and so are annotations (_ANNOTATIONS); an `mla` block
    gives DeepSeek's latent attention sizes, which HF reads at the top level. A multimodal
    wrapper (Gemma 3) gives its text decoder's config: the target is the text-only causal LM.
    """
    # transformers' configs are strict dataclasses: a bad value raises huggingface_hub's error
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    _, raw, source = load_model_config(model_ref)
    config_class = _config_class(raw.get("model_type"), CONFIG_MAPPING, source)
    values = _config_values(raw)
    sub_configs = config_class.sub_configs
    if "text_config" in sub_configs:  # a multimodal wrapper: its text decoder
        nested = raw.get("text_config")
        if isinstance(nested, dict):  # an HF config.json: the top level's sizes win, as in load_model
            values = {**_config_values(nested), **{k: values[k] for k in REQUIRED_MODEL_KEYS if k in values}}
        else:  # a profile: the decoder's keys at the top level, beside the other towers' configs
            values = {k: v for k, v in values.items() if k not in sub_configs and k != "model_type"}
        text_class = sub_configs["text_config"]
        if "model_type" in values or not getattr(text_class, "model_type", ""):  # AutoConfig: named by the dict
            text_class = _config_class(values.get("model_type"), CONFIG_MAPPING, f"{source} text_config")
        config_class = text_class
    values.pop("model_type", None)
    try:
        return config_class(**values)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise FitplanError(f"{source}: transformers rejects it as a {config_class.model_type} config: {reason}") \
            from None


def _config_class(model_type, mapping, source: str):
    """The config class of a model_type; a profile may annotate it: "gemma3 (text_config.model_type ...)"."""
    if not isinstance(model_type, str) or not model_type.strip():
        raise FitplanError(f"{source}: no model_type (transformers needs one to build the model)")
    leading = re.match(r"\s*([\w-]+)", model_type)
    for key in (model_type, leading.group(1) if leading else None):
        if key in mapping:
            return mapping[key]
    raise FitplanError(f"{source}: transformers does not know model_type {model_type!r}")


def _config_values(raw: dict) -> dict:
    """The keys of a profile or config.json that go to the transformers config."""
    values = dict(raw)
    values.pop("quantization_config", None)  # bf16 experts (no MXFP4 / FP8 kernels)
    mla = values.get("mla")
    if isinstance(mla, dict):
        for key in _MLA_KEYS:
            if mla.get(key) is not None and values.get(key) is None:
                values[key] = mla[key]
    return {
        k: v for k, v in values.items()
        if (v is not None or k in _NULL_IS_A_VALUE) and not _is_annotation(k)
    }


def _is_annotation(key: str) -> bool:
    return key in _ANNOTATIONS or key.startswith("params_") or key.endswith(_ANNOTATION_SUFFIXES)


def load_target(model_ref: str, random_weights: bool, device: torch.device, ctx=None) -> torch.nn.Module:
    """Frozen bf16 target on `device`, split over ctx's TP group: random weights built in place, or from_pretrained."""
    from transformers import AutoModelForCausalLM

    from trainer import parallel

    if random_weights:
        model = build_random(hf_config(model_ref), device, ctx)
    else:
        path = Path(model_ref).expanduser()
        if not path.is_dir():
            raise FitplanError(
                f"--model {model_ref!r}: training needs a local model directory (or --random-weights)"
            )
        if not _has_weights(path):
            raise FitplanError(f"{path}: no weights (*.safetensors or *.bin); use --random-weights for a memory check")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device})
        if ctx is not None:
            model = parallel.parallelize_target(model, ctx)
    model.requires_grad_(False)
    return model.eval()


def build_random(config, device: torch.device, ctx=None, seed: int = 0) -> torch.nn.Module:
    """Random bf16 weights, materialized and split one decoder layer at a time.

    Built on the meta device first, so a rank never holds more than its shards plus one whole
    layer (a target larger than one GPU). Every weight is drawn from a generator seeded by its
    name, so the weights are the same whatever the TP size: a TP run and a one-process run of
    the same job train against the same target.
    """
    from transformers import AutoModelForCausalLM

    from trainer import parallel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    std = getattr(config, "initializer_range", 0.02)
    init_buffers = model._init_weights
    for index, layer in enumerate(decoder_layers(model)):
        _materialize(layer, f"model.layers.{index}.", device, std, seed, init_buffers)
        if ctx is not None:
            parallel.parallelize_layer(layer, ctx)
    tied = getattr(config, "tie_word_embeddings", False)
    # a tied lm_head is not materialized at all: tying makes it the embedding's tensor, and a
    # [V, h] of its own, even for a moment, would be the load's peak
    head = model.get_output_embeddings() if tied else None
    rest = [(n, m) for n, m in model.named_modules()
            if m is not head and any(p.is_meta for p in m.parameters(recurse=False))]
    for name, module in rest:
        _materialize(module, f"{name}.", device, std, seed, init_buffers, recurse=False)
    if tied:
        model.tie_weights()
    if ctx is not None:
        parallel.parallelize_root(model, ctx)
    _rebuild_rotary(model, device)
    return model


def _materialize(module: torch.nn.Module, prefix: str, device: torch.device, std: float, seed: int,
                 init_buffers, recurse: bool = True) -> None:
    module.to_empty(device=device, recurse=recurse)
    # to_empty leaves buffers as whatever was in memory (Gemma's embed_scale, DeepSeek's router
    # e_score_correction_bias): the model's own _init_weights sets them (and its parameters,
    # which the seeded draws below then replace).
    for owner in module.modules() if recurse else (module,):
        if next(owner.buffers(recurse=False), None) is not None:
            init_buffers(owner)
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=recurse):
            full = prefix + name
            if param.dim() == 1:  # norm weights 1, biases and attention sinks 0
                param.fill_(1.0 if "norm" in full else 0.0)
                continue
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
            param.normal_(0.0, std, generator=gen)


def _rebuild_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """to_empty leaves non-persistent buffers (rotary inv_freq) as garbage: build the module again."""
    rotary = model.get_decoder().rotary_emb
    with torch.device(device):
        model.get_decoder().rotary_emb = type(rotary)(config=model.config).to(device)


def load_tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    path = Path(model_ref).expanduser()
    if not (path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))):
        raise FitplanError(f"--model {model_ref!r}: no tokenizer files there; real data needs the target's tokenizer")
    return AutoTokenizer.from_pretrained(path)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_decoder().layers


class TappedTarget:
    """Runs the target and returns (aux hidden [B, S, 3h], logits [B, S, V])."""

    def __init__(self, model: torch.nn.Module, aux_layers: tuple[int, ...]):
        self.model = model
        self.captured: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self.aux_layers = aux_layers
        for i in aux_layers:
            layers[i].register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def capture(module, args, output):
            self.captured[index] = output[0] if isinstance(output, tuple) else output

        return capture

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        aux = torch.cat([self.captured[i] for i in self.aux_layers], dim=-1)
        self.captured.clear()
        return aux, logits
