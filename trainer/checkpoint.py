"""Checkpoints in the layout SGLang and vLLM load for Eagle3 drafts, plus the training state.

    OUTPUT/step-000050/config.json          architectures ["LlamaForCausalLMEagle3"], draft_vocab_size
    OUTPUT/step-000050/model.safetensors    draft weights (bf16), embed_tokens, d2t, t2d
    OUTPUT/step-000050/training_state.pt    optimizer, scheduler, data position, RNG, fingerprint

A checkpoint is written into a temporary folder and renamed into place, so a crash never
leaves a half-written step folder; `--resume` takes the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fitplan.errors import FitplanError

STATE = "training_state.pt"


def step_dir(output: Path, step: int) -> Path:
    return output / f"step-{step:06d}"


def export_tensors(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in draft.state_dict().items():
        t = t.detach().cpu()  # cast on the host: no bf16 copy of fp32 weights on the GPU
        out[name] = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output: Path, step: int, draft, optimizer, scheduler, data_position: int, fingerprint: dict) -> Path:
    final = step_dir(output, step)
    tmp = output / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(draft.cfg.to_hf(), indent=2))
    save_file(export_tensors(draft), tmp / "model.safetensors")
    torch.save(
        {
            "step": step,
            "fingerprint": fingerprint,
            "params": {n: p.detach().cpu() for n, p in draft.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_position": data_position,
            "rng": rng_state(),
        },
        tmp / STATE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest(output: Path) -> Path | None:
    done = sorted(p for p in output.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def resume(output: Path, draft, optimizer, scheduler, fingerprint: dict) -> tuple[int, int]:
    """Restore the newest checkpoint under `output`; returns (step done, data position)."""
    path = latest(output)
    if path is None:
        raise FitplanError(f"--resume: no checkpoint under {output}")
    state = torch.load(path / STATE, weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise FitplanError(f"--resume: {path} was trained with a different config ({', '.join(changed)} differ)")
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.requires_grad:
                p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["data_position"]


def load_export(path: Path, draft: torch.nn.Module) -> None:
    """Load an exported model.safetensors into a draft of the same config (for checks and reuse)."""
    draft.load_state_dict(load_file(path / "model.safetensors"))
