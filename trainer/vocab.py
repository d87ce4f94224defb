"""The draft vocab: the Vd most frequent target tokens of the training data.

`d2t[i]` is the offset from draft id i to its target id (SGLang/vLLM convention: target id =
i + d2t[i]); `t2d` is a bool mask over the target vocab. Computed once, cached beside the data (a JSONL
file, or a features directory: trainer/features.py counts the stored input_ids).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def top_tokens(samples, vocab: int, draft_vocab: int) -> torch.Tensor:
    """Sorted target ids of the `draft_vocab` most frequent loss tokens; ties and unseen ids by id."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for ids, mask in samples:
        counts += torch.bincount(ids[mask.bool()], minlength=vocab)[:vocab]
    # stable sort: among equal counts the lower id wins, so the map is deterministic
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:draft_vocab].sort().values


def mapping(target_ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    d2t = target_ids - torch.arange(len(target_ids))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    return d2t, t2d


def cache_path(data: Path, vocab: int, draft_vocab: int, max_length: int) -> Path:
    return data.with_name(f"{data.name}.vocab-{vocab}-{draft_vocab}-{max_length}.pt")


def load_or_build(samples, vocab: int, draft_vocab: int, cache: Path | None) -> torch.Tensor:
    """Target ids of the draft vocab, from `cache` if it is there, else counted and cached."""
    if cache is not None and cache.is_file():
        return torch.load(cache)
    ids = top_tokens(samples, vocab, draft_vocab)
    save_cache(ids, cache)
    return ids


def save_cache(obj, cache: Path | None) -> None:
    """Write `obj` to `cache` whole or not at all; a folder that cannot take it only costs the
    next run a recount (the cache sits beside the user's data, which may be read-only)."""
    if cache is None:
        return
    tmp = cache.with_name(cache.name + ".tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(cache)
    except (OSError, RuntimeError):  # torch.save's zip writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
