"""The frozen target: a transformers causal LM run under no_grad, with three layers tapped.

Forward hooks on the aux layers capture their outputs (the hidden states the draft reads);
the LM head's logits cover every position. Nothing here keeps a graph: the target is frozen.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from fitplan.errors import FitplanError
from fitplan.profiles import load_model_config

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(g)) for g in WEIGHT_GLOBS)


def hf_config(model_ref: str):
    """A transformers config for a profile name, config.json or model directory."""
    from transformers import AutoConfig

    _, raw, source = load_model_config(model_ref)
    raw = {k: v for k, v in raw.items() if k != "quantization_config"}  # bf16 experts (no MXFP4 kernels)
    model_type = raw.get("model_type")
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except (KeyError, ValueError) as exc:
        raise FitplanError(f"{source}: transformers does not know model_type {model_type!r} ({exc})") from None


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
    for index, layer in enumerate(decoder_layers(model)):
        _materialize(layer, f"model.layers.{index}.", device, std, seed)
        if ctx is not None:
            parallel.parallelize_layer(layer, ctx)
    rest = [(n, m) for n, m in model.named_modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    for name, module in rest:
        _materialize(module, f"{name}.", device, std, seed, recurse=False)
    if ctx is not None:
        parallel.parallelize_root(model, ctx)
    _rebuild_rotary(model, device)
    return model


def _materialize(module: torch.nn.Module, prefix: str, device: torch.device, std: float, seed: int,
                 recurse: bool = True) -> None:
    module.to_empty(device=device, recurse=recurse)
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
