"""The draft vocab: the Vd most frequent target tokens of the training data.

`d2t[i]` is the offset from draft id i to its target id (SGLang/vLLM convention: target id =
i + d2t[i]); `t2d` is a bool mask over the target vocab. Computed once, cached beside the data.
"""

from __future__ import annotations

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
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(ids, tmp)
        tmp.replace(cache)
    return ids
