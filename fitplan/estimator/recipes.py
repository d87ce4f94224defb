"""Training state per parameter (precision recipes, docs/estimate.md "Trained state") and how sharding splits it.

A `TrainedState` answers "how many bytes of params / grads / master / moments does this rank
hold" for a trained model (the Eagle3 draft or the sft model), given the recipe, the optimizer,
the ZeRO level over the data-parallel ranks and CPU offload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fitplan.config import RunSpec
from fitplan.layout import splits_master
from fitplan.units import FP32


@dataclass(frozen=True)
class Recipe:
    param: int  # bytes per parameter of the model's own weights
    grad: int
    master: int  # fp32 master copy held outside the model's weights
    moments: int  # Adam exp_avg + exp_avg_sq
    grad_copy: int = 0  # fp32 copy of the grads made inside the step (BF16Optimizer)
    cast: int = 0  # bf16 weight casts autocast keeps through forward and backward
    lazy_master: bool = False  # master created inside the first optimizer.step()


RECIPES = {
    # classic mixed precision: bf16 working copy + fp32 master, fp32 grads, fp32 Adam: 18 B/param
    "mixed": Recipe(param=2, grad=4, master=4, moments=8),
    # fp32 params under torch.autocast(bf16): 16 B/param plus bf16 casts of the weights
    "fp32-autocast": Recipe(param=4, grad=4, master=0, moments=8, cast=2),
    # bf16 params; the optimizer holds an fp32 master and moments (SpecForge's BF16Optimizer):
    # 16 B/param plus a 4 B/param fp32 grad copy at the step (all at once; one parameter's at a
    # time with RunSpec optimizer_per_param, param_steps.py)
    "bf16-master": Recipe(param=2, grad=2, master=4, moments=8, grad_copy=4, lazy_master=True),
    # pure bf16: torch AdamW moments take the param dtype: 8 B/param
    "bf16": Recipe(param=2, grad=2, master=0, moments=4),
}

# bf16-master with the master split (RunSpec split_master, trainer/split_master.py): the bf16
# parameter is the master's high half, 2 B/param of low bits beside it, made in the first step;
# the step reads the bf16 gradient, so no copy: 14 B/param
SPLIT_MASTER = Recipe(param=2, grad=2, master=2, moments=8, lazy_master=True)


def recipe_of(spec: RunSpec) -> Recipe:
    return SPLIT_MASTER if splits_master(spec) else RECIPES[spec.precision]

# optimizer adamw-8bit is torchao's AdamW8bit (0.18; torchao/optim/adam.py, subclass_8bit.py):
# each moment of a tensor is an OptimState8bit of uint8 codes (1 B/element) and one fp32 scale
# per block of 256 elements, so the two moments take 2 x (1 + 4/256) = 2.03125 B/param. Not
# counted, as they are under 0.1% of a draft's or model's moments: each moment's 256-entry fp32
# lookup table (1 KiB per tensor), and the tensors under 4096 elements (or not a multiple of
# 256: norms narrower than 4096), whose moments stay in the parameter's dtype.
ADAM_8BIT_BLOCK = 256
ADAM_8BIT_MOMENT_BYTES = 2 * (1 + FP32 / ADAM_8BIT_BLOCK)
# torchao's AdamW8bit keeps a tensor's moments in 8 bits only from this many elements on
# (and only for a whole number of blocks); smaller ones get moments in the parameter's dtype.
ADAM_8BIT_MIN_NUMEL = 4096


def quantized_moments(elements: int) -> bool:
    """Whether torchao's AdamW8bit keeps 8-bit moments for a tensor (a shard: its local elements)."""
    return elements >= ADAM_8BIT_MIN_NUMEL and elements % ADAM_8BIT_BLOCK == 0


# optimizer muon is torch.optim.Muon as speculators builds it: one momentum buffer per weight, in the
# weight's dtype (fp32 there). speculators hands the weights Muon cannot take (the draft's norms: 4h
# of its parameters, under 0.01%) to AdamW at 8 B each; not counted.
MUON_MOMENT_BYTES = 4


def moment_bytes_per_param(spec: RunSpec) -> float:
    if spec.optimizer == "muon":
        return MUON_MOMENT_BYTES
    return ADAM_8BIT_MOMENT_BYTES if spec.optimizer == "adamw-8bit" else RECIPES[spec.precision].moments


@dataclass(frozen=True)
class TrainedState:
    """Bytes one rank holds for a trained model of `trainable` (+ `frozen`) parameters.

    ZeRO levels over the ranks: zero1 shards the optimizer state, zero2 also grads and (FSDP)
    the stored params, zero3 also reshards params after forward (see `params`)."""

    spec: RunSpec
    trainable: int
    frozen: int  # frozen params stored with the model (the draft's embedding), bf16
    ranks: int  # data-parallel ranks the ZeRO sharding spans
    frozen_bytes_per_param: int = 2

    @property
    def recipe(self) -> Recipe:
        return recipe_of(self.spec)

    def _split(self, nbytes: int, level: int) -> int:
        """Divide by the ranks when the ZeRO level shards this state (1 optimizer, 2 grads/params)."""
        zero = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}[self.spec.sharding]
        return -(-nbytes // self.ranks) if zero >= level else nbytes

    def on_rank(self, elements: int, level: int) -> int:
        """A tensor's elements on this rank: its shard where the ZeRO level shards what it holds
        (1 optimizer state, 2 grads and params)."""
        return self._split(elements, level)

    def full_params(self) -> int:
        return self.trainable * self.recipe.param + self.frozen * self.frozen_bytes_per_param

    def params(self) -> int:
        """Resident params between uses. FSDP (zero2 and zero3) stores only this rank's shard and
        gathers units for compute (zero2 keeps them gathered from forward until backward ends,
        zero3 one unit at a time); offloaded params live on the CPU."""
        if self.spec.offload == "params":
            return 0
        return self._split(self.full_params(), 2)

    def fsdp(self) -> bool:
        """Parameters are sharded and gathered (zero2/zero3 over several ranks, or offloaded)."""
        return self.sharded_grads() or self.spec.offload == "params"

    def full_grads(self) -> int:
        return self.trainable * self.recipe.grad

    def grads(self) -> int:
        return self._split(self.full_grads(), 2)

    def _optimizer_state(self, per_param: float) -> int:
        """Optimizer state on the GPU: none when it is offloaded (trainer/offload.py keeps masters,
        moments and the fp32 grad copy in host memory)."""
        if self.spec.offload != "none":
            return 0
        return self._split(math.ceil(self.trainable * per_param), 1)

    def master(self) -> int:
        return self._optimizer_state(self.recipe.master)

    def moments(self) -> int:
        return self._optimizer_state(moment_bytes_per_param(self.spec))

    def grad_copy(self) -> int:
        return self._optimizer_state(self.recipe.grad_copy)

    def ddp_buckets(self) -> int:
        """Unsharded grads on several ranks go through DDP (ZeroRedundancyOptimizer wraps DDP for
        zero1), whose reducer keeps gradient buckets as large as the grads for its lifetime
        (gradient_as_bucket_view=False, the default)."""
        replicated = self.spec.sharding in ("none", "zero1")
        return self.full_grads() if replicated and self.ranks > 1 else 0

    def sharded_grads(self) -> bool:
        """Grads are reduce-scattered (zero2/zero3 over several ranks), not all-reduced."""
        return self.spec.sharding in ("zero2", "zero3") and self.ranks > 1

    def casts(self) -> int:
        """bf16 weight casts under autocast, live from forward through backward."""
        return self.trainable * self.recipe.cast
