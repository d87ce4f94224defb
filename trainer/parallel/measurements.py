"""Measurements from every rank folded into one report: the max over ranks, imbalance flagged.

The fullest GPU decides whether a job fits, so the report keeps the max; a spread over 5%
between ranks (e.g. rank 0 holding extra buffers) is flagged since the estimator assumes
identical ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from trainer.parallel.context import DistContext

IMBALANCE_LIMIT = 0.05


@dataclass
class Gathered:
    max: dict  # the per-rank dict's shape, each number replaced by its max over ranks
    per_rank: list  # every rank's dict, in rank order
    imbalanced: dict = field(default_factory=dict)  # "a.b.c" -> (max - min) / max, where over 5%


def gather_measurements(per_rank: dict, ctx: DistContext) -> Gathered:
    """Collective: every rank calls it with its own (nested) dict of numbers; all get the result."""
    if ctx.distributed:
        ranks: list[Any] = [None] * ctx.world
        dist.all_gather_object(ranks, per_rank)
    else:
        ranks = [per_rank]
    imbalanced: dict[str, float] = {}
    return Gathered(_fold(ranks, "", imbalanced), ranks, imbalanced)


def _fold(values: list, path: str, imbalanced: dict) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _fold([v[k] for v in values], f"{path}.{k}" if path else k, imbalanced) for k in first}
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first  # labels (device name, ...) are taken from rank 0
    high, low = max(values), min(values)
    spread = (high - low) / high if high > 0 else 0.0
    if spread > IMBALANCE_LIMIT:
        imbalanced[path] = spread
    return high
