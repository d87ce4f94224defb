"""What a run from precomputed features keeps of the target: its lm_head and its embedding.

SpecForge's offline trainer scores the stored last hidden state (after the final norm) with the
target's lm_head to get the teacher's logits; the draft's frozen embedding is a copy of the
target's. Nothing else of the target is loaded: the two [V, h] tensors are read out of the
checkpoint's safetensors (no decoder layer is touched), or drawn with the same seeded draws
`trainer.target.build_random` gives those tensors, so a random-weights run from features that a
random target wrote trains against that target's head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fitplan.errors import FitplanError
from trainer.target import _materialize, hf_config

INDEX = "model.safetensors.index.json"


class FrozenHead(nn.Module):
    """The target's lm_head ([V, h] bf16) applied to final hidden states, with the target's logit
    soft-cap when it has one (Gemma 2); the embedding is held only until the draft has copied it."""

    def __init__(self, lm_head: torch.Tensor, embedding: torch.Tensor, softcap: float | None):
        super().__init__()
        self.weight = lm_head
        self.embedding: nn.Embedding | None = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.softcap = softcap

    def get_input_embeddings(self) -> nn.Embedding:
        if self.embedding is None:
            raise RuntimeError("the target embedding was released once the draft copied it")
        return self.embedding

    def release_embedding(self) -> None:
        """Drop the embedding (the draft holds its copy); a tied lm_head keeps the tensor alive."""
        self.embedding = None

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.softcap:  # in place: no second [B, S, V] beside the logits
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


def load_head(model_ref: str, random_weights: bool, device: torch.device, seed: int = 0) -> FrozenHead:
    config = hf_config(model_ref)
    embed_name, head_name = _module_names(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if random_weights:
        embedding, lm_head = _random(config, embed_name, head_name, tied, device, seed)
    else:
        embedding, lm_head = _from_checkpoint(Path(model_ref).expanduser(), embed_name, head_name, tied, config, device)
    return FrozenHead(lm_head, embedding, getattr(config, "final_logit_softcapping", None))


def _module_names(config) -> tuple[str, str]:
    """Qualified names of the input embedding and the lm_head in transformers' model of `config`
    (built on the meta device: nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]


def _random(config, embed_name: str, head_name: str, tied: bool, device: torch.device, seed: int):
    """The two tensors build_random draws for these names (same generator seeds, same order of use)."""
    std = getattr(config, "initializer_range", 0.02)
    shape = (config.vocab_size, config.hidden_size)
    tensors = {}
    for name in (embed_name,) if tied else (embed_name, head_name):
        with torch.device("meta"):
            module = nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
        _materialize(module, f"{name}.", device, std, seed, init_buffers=None, recurse=False)
        tensors[name] = module.weight.detach().requires_grad_(False)
    embedding = tensors[embed_name]
    return embedding, embedding if tied else tensors[head_name]


def _from_checkpoint(path: Path, embed_name: str, head_name: str, tied: bool, config, device: torch.device):
    if not path.is_dir():
        raise FitplanError(f"--model {str(path)!r}: training from --hidden-states reads the target's lm_head and "
                           "embedding from a local model directory (or give --random-weights)")
    where = _weight_map(path)
    shape = (config.vocab_size, config.hidden_size)
    embedding = _read(path, where, embed_name, shape, device)
    if tied or not _find(where, head_name):
        if not tied:
            raise FitplanError(f"{path}: no {head_name}.weight in its safetensors and the config does not tie the "
                               "lm_head to the embedding; the teacher needs the target's lm_head")
        return embedding, embedding
    return embedding, _read(path, where, head_name, shape, device)


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index or from every file's header."""
    from safetensors import safe_open

    index = path / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FitplanError(f"{index}: unreadable safetensors index ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FitplanError(f"{path}: no *.safetensors; training from --hidden-states reads the lm_head and embedding "
                           "from them (or give --random-weights)")
    where = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file.name))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise FitplanError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return where


def _find(where: dict[str, str], module: str) -> str | None:
    """The checkpoint key of `module`'s weight: its own name, else the one key ending like it
    (checkpoints of multimodal wrappers prefix the text model's names)."""
    exact = f"{module}.weight"
    if exact in where:
        return exact
    tail = ".".join(exact.split(".")[-2:])
    matches = sorted((k for k in where if k == tail or k.endswith("." + tail)), key=len)
    return matches[0] if matches else None


def _read(path: Path, where: dict[str, str], module: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    from safetensors import safe_open

    key = _find(where, module)
    if key is None:
        raise FitplanError(f"{path}: no {module}.weight in its safetensors")
    file = path / where[key]
    try:
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - missing file, truncated data: safetensors' own error types
        raise FitplanError(f"{file}: cannot read {key} ({str(exc).splitlines()[0]})") from None
    if tuple(tensor.shape) != shape:
        raise FitplanError(f"{file}: {key} is {list(tensor.shape)} but the config says [vocab, hidden] = {list(shape)}")
    return tensor.to(device=device, dtype=torch.bfloat16)
