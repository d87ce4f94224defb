"""Checks shared by the tests of the written step sequences (step_events, sft_events, FSDP/TP)."""

from __future__ import annotations


def phase_total(est, label: str) -> int:
    """The estimator's allocated bytes of a sequence's phase label ("load", "step1.x", "steady.x")."""
    if label == "load":
        return est.phase_allocated("load")
    when, phase = label.split(".")
    return est.phase_allocated(phase, step1=when == "step1")


def live_after(built, end: int | None = None) -> int:
    """Bytes allocated and not freed after the first `end` events (all of them by default)."""
    sizes: dict = {}
    for event in built.events[:end]:
        if event.op == "alloc":
            sizes[event.key] = event.size
        elif event.op != "empty_cache":  # a retired block leaves at its retire; its free finds nothing
            sizes.pop(event.key, None)
    return sum(sizes.values())


def assert_peak_is_phase_sum(label: str, live: int, total: int, grads: int) -> None:
    """A phase's live peak is its sum within 1%; in backward, AccumulateGrad stores each gradient
    as the last step's backward reaches its parameter, so the trainer holds up to the grads more
    at the estimator's backward instants."""
    if label.endswith("backward"):
        assert total * 0.99 <= live <= total * 1.01 + grads, (label, live, total)
    else:
        assert abs(live - total) <= 0.01 * total, (label, live / total - 1)


def case_ids(cases: list[dict]) -> list[str]:
    """Test ids of spec-change cases: "key=value,..." ("default" for none)."""
    return [",".join(f"{k}={v}" for k, v in kw.items()) or "default" for kw in cases]
