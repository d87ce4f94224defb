"""TrainOptions: how `fitplan train` runs a RunSpec (the job) on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fitplan.config import RunSpec


@dataclass
class TrainOptions:
    spec: RunSpec  # the job: model, draft, seq, micro_batch, accum, precision, ac, ttt, ...
    output: Path
    steps: int = 10
    data: Path | None = None  # ShareGPT-style JSONL; None with synthetic_data
    synthetic_data: bool = False
    random_weights: bool = False
    lr: float = 1e-4
    warmup: int = 0  # steps of linear warmup before the cosine decay
    max_grad_norm: float = 0.5
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    snapshot_on_miss: bool = True  # record allocator history on CUDA, dump it on a >10% miss
