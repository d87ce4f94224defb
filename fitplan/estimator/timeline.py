"""What a workload model hands back: the components live at each phase's peak, for step 1 and
for steady state, plus the candidates for the largest single allocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Component(str, Enum):
    """The allocator-level terms of an estimate (docs/architecture.md, "Components")."""

    TARGET_WEIGHTS = "target.weights"
    TARGET_ACTIVATIONS = "target.activations"
    TARGET_OUTPUTS = "target.outputs"
    TARGET_KV_POOL = "target.kv_pool"
    LOGITS_TARGET = "logits.target"
    LOGITS_TEACHER = "logits.teacher"
    DRAFT_PARAMS = "draft.params"
    DRAFT_GRADS = "draft.grads"
    OPTIMIZER_MASTER = "optimizer.master"
    OPTIMIZER_MOMENTS = "optimizer.moments"
    OPTIMIZER_GRAD_COPY = "optimizer.grad_copy"
    ACTIVATIONS_DRAFT = "activations.draft"
    LOGITS_DRAFT = "logits.draft"
    MODEL_PARAMS = "model.params"
    MODEL_GRADS = "model.grads"
    ACTIVATIONS_MODEL = "activations.model"
    LOGITS_MODEL = "logits.model"
    COMM_BUFFERS = "comm.buffers"
    RUNTIME_WORKSPACE = "runtime.workspace"

    __str__ = str.__str__
    __format__ = str.__format__


_KNOWN = {c.value for c in Component}


def _name(name: str) -> str:
    if name not in _KNOWN:
        raise ValueError(f"unknown estimate component {name!r}; known: {', '.join(sorted(_KNOWN))}")
    return name


def phase(**components: int) -> dict[str, int]:
    """A phase's components with dotted names (`draft__params` -> `draft.params`), zeros dropped."""
    return {_name(name.replace("__", ".")): int(b) for name, b in components.items() if b}


def merge(*parts: dict[str, int]) -> dict[str, int]:
    """Sum phases' components: what is live at once."""
    out: dict[str, int] = {}
    for part in parts:
        for name, nbytes in part.items():
            if nbytes:
                name = _name(str(name))
                out[name] = out.get(name, 0) + int(nbytes)
    return out


@dataclass
class Timeline:
    steady: dict[str, dict[str, int]] = field(default_factory=dict)
    step1: dict[str, dict[str, int]] = field(default_factory=dict)
    largest: list[tuple[int, str]] = field(default_factory=list)  # (bytes, tensor name)
    notes: list[str] = field(default_factory=list)

    def candidate(self, nbytes: int, name: str) -> None:
        self.largest.append((int(nbytes), name))
