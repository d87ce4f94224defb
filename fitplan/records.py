"""The records fitplan writes and reads back, typed and versioned, read and written only here.

- A plan (`fitplan fit -o plan.yaml`, read by `fitplan train --plan`): ``fitplan_plan: 1``, the
  complete job under ``config:`` (tp and accum resolved), the estimate under ``prediction:``
  and the fix ladder's ``trail:``.
- A measurement (`fitplan train` writes OUTPUT/report.json): ``fitplan_report: 1``, the job
  (``config``), the ranks and device, the prediction made at run time, the measured peaks of
  the load and of every step's phases, and the allocator's events (``alloc_retries``: times
  the caching allocator freed its cache and retried a request; ``ooms``). Reports written
  before the version key existed are read as version 1: the fields were the same.

A record of another version is refused with the versions this fitplan reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fitplan.config import RunSpec, load_yaml_mapping, spec_from_mapping
from fitplan.errors import FitplanError

PLAN_VERSION = 1
REPORT_VERSION = 1


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    config: RunSpec
    prediction: dict[str, Any] = field(default_factory=dict)
    trail: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "fitplan_plan": PLAN_VERSION,
            "config": self.config.to_dict(),
            "prediction": self.prediction,
            "trail": list(self.trail),
        }


def is_plan(data: dict[str, Any]) -> bool:
    return "fitplan_plan" in data


def plan_from_mapping(data: dict[str, Any], source: str) -> Plan:
    version = data.get("fitplan_plan")
    if version != PLAN_VERSION:
        raise FitplanError(
            f"{source}: plan version {version!r} is not one this fitplan reads (accepted: fitplan_plan: {PLAN_VERSION})"
        )
    if not isinstance(data.get("config"), dict):
        raise FitplanError(f"{source}: plan has no 'config:' mapping (the job's keys)")
    prediction, trail = data.get("prediction") or {}, data.get("trail") or []
    if not isinstance(prediction, dict) or not isinstance(trail, list):
        raise FitplanError(f"{source}: plan's 'prediction' must be a mapping and 'trail' a list")
    config = old_defaults_auto(vllm_share_moved(data["config"]))
    return Plan(spec_from_mapping(config, f"{source} config"), prediction, tuple(trail))


def vllm_share_moved(config: dict[str, Any]) -> dict[str, Any]:
    """A speculators plan written while sglang_mem_fraction also held a co-located vLLM server's
    gpu_memory_utilization, with that value under vllm_gpu_memory_utilization, its own key now."""
    if config.get("runtime") != "speculators" or config.get("sglang_mem_fraction") is None:
        return config
    if config.get("vllm_gpu_memory_utilization") is not None:
        return config
    return {**config, "sglang_mem_fraction": None, "vllm_gpu_memory_utilization": config["sglang_mem_fraction"]}


def read_plan(path: str | Path) -> Plan:
    data = load_yaml_mapping(path)
    if not is_plan(data):
        raise FitplanError(f"{path}: not a fitplan plan (expected 'fitplan_plan: {PLAN_VERSION}' at the top)")
    return plan_from_mapping(data, str(path))


def write_plan(plan: Plan, path: str | Path) -> None:
    check_writable(path)
    try:
        Path(path).write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False))
    except OSError as exc:
        raise FitplanError(f"cannot write the plan to {path}: {exc.strerror}") from None


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
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise FitplanError(f"-o {p}: cannot write there (permission denied); give another path")


# ---------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Measurement:
    """A `fitplan train` report: the job, where it ran, and what was measured."""

    config: RunSpec
    world: int
    device: str
    steps: tuple[dict[str, Any], ...]
    load: dict[str, dict[str, int]]
    prediction: dict[str, Any] | None
    oom: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)  # every field, as written

    @property
    def alloc_retries(self) -> int:
        """Cache flushes and retries of the allocator over the run (0 where not measured)."""
        return max((s.get("allocator", {}).get("alloc_retries", 0) for s in self.steps), default=0)

    @property
    def ooms(self) -> int:
        return max((s.get("allocator", {}).get("ooms", 0) for s in self.steps), default=int(self.oom is not None))


# Job keys a stored run may predate, with what fitplan's trainer ran before each existed.
PREDATING_KEYS = {"draft_memory": "plain", "recompute_norms": False, "share_embedding": False, "sum_step_grads": False,
                  "optimizer_per_param": False, "head_grad_in_forward": False, "project_embedding_once": False,
                  "split_master": False}


def stored_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run's config as the job it ran: keys it predates take their historic value."""
    return old_defaults_auto(attention_ran({**PREDATING_KEYS, **config}))


def attention_ran(config: dict[str, Any]) -> dict[str, Any]:
    """Reports name the attention they ran; one without it (None) ran the default of its time,
    flex for every eagle3 job (the split attention came later, as the default from seq 4096)."""
    if config.get("attention") is not None or config.get("workload", "eagle3") != "eagle3":
        return config
    return {**config, "attention": "flex"}


# Knobs that were plain values before they took auto (None), with the default they then had:
# every plan, report and checkpoint of that time holds it, also where the knob did nothing.
OLD_DEFAULTS = {"sum_step_grads": True, "draft_memory": "lean", "recompute_norms": True}


def old_defaults_auto(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config as auto where it holds what auto now runs: an old default read as auto (the
    same job where the knob applies, accepted where it does not: fitplan.layout refuses the
    knob given there), and draft_memory, which then took any value, as auto where fitplan's
    trainer runs no eagle3 draft (sft, another runtime: the knob did nothing)."""
    auto = {k for k, old in OLD_DEFAULTS.items() if k in config and config[k] == old}
    no_draft = config.get("runtime", "fitplan") != "fitplan" or config.get("workload", "eagle3") != "eagle3"
    if no_draft and "draft_memory" in config:
        auto.add("draft_memory")
    return {**config, **dict.fromkeys(auto)}


def is_measurement(data: Any) -> bool:
    return isinstance(data, dict) and "steps" in data and "config" in data


def measurement_from_mapping(data: dict[str, Any], source: str) -> Measurement:
    version = data.get("fitplan_report", REPORT_VERSION)
    if version != REPORT_VERSION:
        raise FitplanError(
            f"{source}: report version {version!r} is not one this fitplan reads (accepted: {REPORT_VERSION})"
        )
    if not isinstance(data["steps"], list) or not isinstance(data.get("load", {}), dict):
        raise FitplanError(f"{source}: a report's 'steps' is a list and 'load' a mapping")
    return Measurement(
        config=spec_from_mapping(stored_config(data["config"]), source=source),
        world=int(data.get("world", 1)),
        device=str(data.get("device", "unknown")),
        steps=tuple(data["steps"]),
        load=data.get("load", {}),
        prediction=data.get("prediction"),
        oom=data.get("oom"),
        raw=data,
    )


def read_measurement(path: str | Path) -> Measurement | None:
    """The report at `path`; None for a JSON file that is not a trainer report."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        raise FitplanError(f"{path}: not JSON") from None
    except OSError as exc:
        raise FitplanError(f"{path}: cannot be read ({exc.strerror})") from None
    return measurement_from_mapping(data, str(path)) if is_measurement(data) else None


def spec_as_committed(measurement: Measurement, path: str | Path) -> RunSpec:
    """The report's job with a scaled profile's config read from configs/ beside the report:
    fitplan.validation.profile_runs writes the config on the device under another folder, and
    the config is committed next to the reports."""
    spec = measurement.config
    if not spec.model.endswith(".json"):
        return spec
    return spec.replace(model=str(Path(path).parent / "configs" / Path(spec.model).name))


def write_measurement(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a run stopped while writing, or a write that fails (disk full, read-only),
    leaves the previous report whole and no partial file; OSError names the file."""
    payload = {"fitplan_report": REPORT_VERSION, **report}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(payload, indent=2, default=float))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OSError(exc.errno, exc.strerror, str(path)) from None
