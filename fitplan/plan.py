"""Plan files: what `fitplan fit -o plan.yaml` writes and `fitplan train --plan` runs.

Format (docs/architecture.md): `fitplan_plan: 1`, `config:` a complete RunSpec (tp and accum
resolved), `prediction:` the Estimate's JSON plus step time and tokens/s, `trail:` the rungs
tried. `fitplan.config.load_spec` reads the `config:` part, so a plan is also a config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fitplan.config import RunSpec, load_yaml_mapping, spec_from_mapping
from fitplan.errors import FitplanError
from fitplan.ladder import Candidate, FitResult

PLAN_VERSION = 1


def prediction(cand: Candidate) -> dict[str, Any]:
    return {**cand.estimate.to_json(), **cand.time.to_json()}


def plan_dict(result: FitResult) -> dict[str, Any]:
    if result.chosen is None:
        raise FitplanError("no configuration fits, so there is no plan to write")
    return {
        "fitplan_plan": PLAN_VERSION,
        "config": result.chosen.spec.to_dict(),
        "prediction": prediction(result.chosen),
        "trail": [entry.to_json() for entry in result.trail],
    }


def check_writable(path: str | Path) -> None:
    """Refuse an output path that cannot take a file, before any work is done."""
    p = Path(path)
    if p.is_dir():
        raise FitplanError(f"-o {p}: is a directory; give a file name such as {p / 'plan.yaml'}")
    parent = p.parent
    if not parent.exists():
        raise FitplanError(f"-o {p}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise FitplanError(f"-o {p}: {parent} is not a directory")


def write_plan(result: FitResult, path: str | Path) -> None:
    check_writable(path)
    try:
        Path(path).write_text(yaml.safe_dump(plan_dict(result), sort_keys=False))
    except OSError as exc:
        raise FitplanError(f"cannot write the plan to {path}: {exc.strerror}") from None


def read_plan(path: str | Path) -> tuple[RunSpec, dict[str, Any]]:
    """(config, the whole plan) of a plan file; a malformed plan is a one-line error."""
    data = load_yaml_mapping(path)
    if data.get("fitplan_plan") != PLAN_VERSION:
        raise FitplanError(f"{path}: not a fitplan plan (expected 'fitplan_plan: {PLAN_VERSION}' at the top)")
    if not isinstance(data.get("config"), dict):
        raise FitplanError(f"{path}: plan has no 'config:' mapping (the RunSpec keys)")
    return spec_from_mapping(data["config"], f"{path} config"), data
