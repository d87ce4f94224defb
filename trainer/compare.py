"""Predicted vs measured memory, phase by phase: the join of an Estimate and the measured steps."""

from __future__ import annotations

from fitplan.estimator.result import PHASES

MISS_FRACTION = 0.10  # beyond this the report flags the phase in red and dumps a snapshot


def _error(measured: int, predicted: int) -> float | None:
    return None if not predicted else 100.0 * (measured - predicted) / predicted


def rows(steps: list[dict], load: dict, prediction: dict | None) -> list[dict]:
    """One row per (phase, step 1 / steady) with bytes and the error in % of the prediction."""
    if not steps:
        return []
    out = []
    steady = steps[1:] or steps[:1]  # steady state is step >= 2; one step only: step 1 stands in
    for name in PHASES:
        for label, measured_steps, key in (("step 1", steps[:1], "step1_phases"), ("steady", steady, "phases")):
            values = [s["phases"][name]["allocated"] for s in measured_steps if name in s["phases"]]
            if name == "load":
                if label != "step 1":
                    continue
                values = [load["load"]["allocated"]] if "load" in load else []
            if not values:
                continue
            predicted = prediction[key].get(name) if prediction else None
            measured = max(values)
            out.append({"phase": name, "when": label, "predicted": predicted, "measured": measured,
                        "error_pct": _error(measured, predicted)})
    device = [p["device_used"] for s in steady for p in s["phases"].values() if p.get("device_used")]
    if device:
        predicted = prediction["peak_reserved_bytes"] if prediction else None
        out.append({"phase": "device peak", "when": "steady", "predicted": predicted, "measured": max(device),
                    "error_pct": _error(max(device), predicted)})
    return out


def missed(table: list[dict]) -> bool:
    return any(r["error_pct"] is not None and abs(r["error_pct"]) > 100 * MISS_FRACTION for r in table)


