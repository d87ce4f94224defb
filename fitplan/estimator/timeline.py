"""What a workload model hands back: the components live at each phase's peak, for step 1 and
for steady state, plus the candidates for the largest single allocation."""

from __future__ import annotations

from dataclasses import dataclass, field


def phase(**components: int) -> dict[str, int]:
    """A phase's components with dotted names (`draft__params` -> `draft.params`), zeros dropped."""
    return {name.replace("__", "."): int(b) for name, b in components.items() if b}


def merge(*parts: dict[str, int]) -> dict[str, int]:
    """Sum phases' components: what is live at once."""
    out: dict[str, int] = {}
    for part in parts:
        for name, nbytes in part.items():
            if nbytes:
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
