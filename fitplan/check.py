"""The CI gate: estimate every config, compare with a baseline, decide pass/fail.

`fitplan check` gives one row per config (verdict, peak, headroom, delta against the same file
at a git revision, the component that moved most); `fitplan diff` compares two configs per
component and per phase. Rendering lives in fitplan/commands/check.py.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fitplan.config import RunSpec, load_spec, spec_from_text
from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate, Verdict

EstimateSpecFn = Callable[[RunSpec], Estimate]


def _default_estimate_spec(spec: RunSpec) -> Estimate:
    from fitplan.estimator import estimate_spec

    return estimate_spec(spec)


@dataclass(frozen=True)
class CheckRow:
    path: str
    estimate: Estimate
    baseline: Estimate | None
    margin: float

    @property
    def verdict(self) -> str:
        """The estimate's verdict in capitals when it fails, TIGHT under the margin, else fits."""
        if not self.estimate.fits:
            return self.estimate.verdict.upper()
        if not self.estimate.fits_with_margin(self.margin):
            return "TIGHT"
        return Verdict.FITS

    @property
    def passed(self) -> bool:
        return self.verdict == Verdict.FITS

    @property
    def delta_bytes(self) -> int | None:
        if self.baseline is None:
            return None
        return self.estimate.peak_reserved_bytes - self.baseline.peak_reserved_bytes

    @property
    def moved_most(self) -> tuple[str, int] | None:
        """The component whose bytes at the peak changed most against the baseline."""
        if self.baseline is None:
            return None
        deltas = component_deltas(self.baseline, self.estimate)
        name = max(deltas, key=lambda n: abs(deltas[n]), default=None)
        return (name, deltas[name]) if name is not None and deltas[name] else None

    def to_json(self) -> dict[str, Any]:
        moved = self.moved_most
        return {
            "path": self.path,
            **self.estimate.to_json(),
            "verdict": str(self.verdict),  # the gate's, with TIGHT, over the estimate's
            "baseline_peak_reserved_bytes": self.baseline.peak_reserved_bytes if self.baseline else None,
            "delta_bytes": self.delta_bytes,
            "moved_most": {"component": moved[0], "delta_bytes": moved[1]} if moved else None,
        }


def component_deltas(old: Estimate, new: Estimate) -> dict[str, int]:
    """new - old per component at each one's peak phase (a missing component counts as 0)."""
    a, b = old.components, new.components
    return {n: b.get(n, 0) - a.get(n, 0) for n in sorted(set(a) | set(b))}


def phase_deltas(old: Estimate, new: Estimate) -> dict[str, int]:
    names = list(old.phases) + [p for p in new.phases if p not in old.phases]
    return {
        p: (new.phase_allocated(p) if p in new.phases else 0) - (old.phase_allocated(p) if p in old.phases else 0)
        for p in names
    }



CONFIG_SUFFIXES = (".yaml", ".yml")


def expand_config_paths(paths: list[str]) -> list[str]:
    """The config files to check: files as given, a directory as its *.yaml and *.yml files (sorted,
    not recursive, hidden ones skipped, like the shell's glob); each file once. Every path is
    checked before any estimate runs, so a typo fails at once."""
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found = sorted(f.name for f in p.iterdir()
                           if f.suffix in CONFIG_SUFFIXES and not f.name.startswith(".") and f.is_file())
            if not found:
                raise FitplanError(f"{path} is a directory with no *.yaml or *.yml files; pass the config files "
                                   f"(YAML, plans or SpecForge launch scripts), e.g. {os.path.join(path, '*.yaml')}")
            files += [os.path.join(path, name) for name in found]
        elif not p.exists():
            raise FitplanError(f"config file {path!r} does not exist")
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def text_at_revision(path: str, rev: str) -> str | None:
    """The file's text at a git revision; None when the file did not exist there."""
    p = Path(path).resolve()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=p.parent, capture_output=True, text=True)

    if run("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode != 0:
        raise FitplanError(f"--against {rev!r} is not a git revision of the repository holding {path}")
    shown = run("show", f"{rev}:./{p.name}")
    return shown.stdout if shown.returncode == 0 else None


def check_configs(
    paths: list[str],
    overrides: dict,
    margin: float,
    against: str | None = None,
    estimate_fn: EstimateSpecFn = _default_estimate_spec,
) -> list[CheckRow]:
    if not paths:
        raise FitplanError("no config files given; usage: fitplan check configs/*.yaml (or a directory of them)")
    rows = []
    for path in expand_config_paths(paths):
        estimate = estimate_fn(load_spec(path, overrides))
        baseline = None
        if against is not None:
            old_text = text_at_revision(path, against)
            if old_text is not None:
                baseline = estimate_fn(spec_from_text(old_text, f"{path}@{against}", overrides))
        rows.append(CheckRow(path, estimate, baseline, margin))
    return rows
