"""TrainOptions: how `fitplan train` runs a RunSpec (the job) on this machine.

`check_numbers` is the range check of the numeric trainer flags; `fitplan train` calls it
first, before anything is loaded or launched, and TrainOptions calls it when made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fitplan.config import RunSpec
from fitplan.errors import FitplanError

MAX_SEED = 2**32 - 1  # the data order seeds torch generators with seed * 1_000_003 + sample: kept in 64 bits


def check_numbers(steps: int, lr: float, warmup: int, seed: int, save_every: int) -> None:
    """One-line FitplanError naming the first flag out of its accepted range."""
    if not isinstance(steps, int) or steps < 1:
        raise FitplanError(f"--steps {steps}: give a whole number of optimizer steps, 1 or more")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise FitplanError(f"--lr {lr}: the peak learning rate must be a finite number above 0 (e.g. 1e-4)")
    if not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise FitplanError(f"--warmup {warmup}: accepted 0 to --steps ({steps}); "
                           "a longer warmup ends the run before the learning rate reaches --lr")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FitplanError(f"--seed {seed}: accepted 0 to {MAX_SEED} (2**32 - 1)")
    if not isinstance(save_every, int) or save_every < 0:
        raise FitplanError(f"--save-every {save_every}: accepted 0 (only at the end) or a positive number of steps")


@dataclass
class TrainOptions:
    spec: RunSpec  # the job: model, draft, seq, micro_batch, accum, precision, ac, ttt, ...
    output: Path
    steps: int = 10
    data: Path | None = None  # ShareGPT-style JSONL; None with synthetic_data or hidden_states
    hidden_states: Path | None = None  # SpecForge offline features (trainer/features.py); the spec is offline
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
    memory_snapshot: bool = False  # dump the recorded allocator history whatever the comparison says
    say: Optional[Callable[[str], None]] = None  # one-line notices (resume, schedule); None: print to stdout

    def __post_init__(self):
        check_numbers(self.steps, self.lr, self.warmup, self.seed, self.save_every)
        self.output = Path(self.output)
        if self.hidden_states is not None:
            self.hidden_states = Path(self.hidden_states)

    def notice(self, message: str) -> None:
        (self.say or print)(message)
