"""The frozen target: a transformers causal LM run under no_grad, with three layers tapped.

Forward hooks on the aux layers capture their outputs (the hidden states the draft reads);
the LM head's logits cover every position. Nothing here keeps a graph: the target is frozen.
"""

from __future__ import annotations

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


def load_target(model_ref: str, random_weights: bool, device: torch.device) -> torch.nn.Module:
    """Frozen bf16 target on `device`: random weights built in place, or from_pretrained."""
    from transformers import AutoModelForCausalLM

    if random_weights:
        config = hf_config(model_ref)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        path = Path(model_ref).expanduser()
        if not path.is_dir():
            raise FitplanError(
                f"--model {model_ref!r}: training needs a local model directory (or --random-weights)"
            )
        if not _has_weights(path):
            raise FitplanError(f"{path}: no weights (*.safetensors or *.bin); use --random-weights for a memory check")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device})
    model.requires_grad_(False)
    return model.eval()


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
