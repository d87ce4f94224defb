"""RunSpec: the user's training job as typed, validated data.

One field per knob. The YAML key of a field is its name (``micro_batch: 2``); the CLI flag is
the same name with dashes (``--micro-batch 2``); flags override the file. Values are
validated here for what can be checked without profiles (choices, positive sizes,
contradictions); checks that need the model or the GPUs (heads divisible by tp, ...) happen
where the spec is resolved against the profiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fitplan.errors import FitplanError

CHOICES: dict[str, tuple[str, ...]] = {
    "workload": ("eagle3", "sft"),
    "sharding": ("none", "zero1", "zero2", "zero3"),
    "output_sharding": ("gather", "all-to-all"),
    "precision": ("mixed", "fp32-autocast", "bf16-master", "bf16"),
    "optimizer": ("adamw", "adamw-8bit"),
    "attention": ("flex", "sdpa", "eager"),
    "target_weights": ("bf16", "mxfp4"),
    "offload": ("none", "optimizer", "params"),
    "runtime": ("fitplan", "specforge"),
    "target_backend": ("sglang", "hf"),
}

POSITIVE_INTS = ("seq", "micro_batch", "global_batch", "accum", "tp", "ttt")


@dataclass(frozen=True)
class RunSpec:
    """A training job as the user describes it (before profiles are resolved)."""

    model: str
    draft: str = "auto"
    gpus: str = "1xH100"
    workload: str = "eagle3"
    seq: int = 4096
    micro_batch: int = 1
    global_batch: int | None = None  # None: micro_batch x data-parallel ranks x accum
    accum: int | None = None  # None: derived from global_batch, else 1
    tp: int | None = None  # None: chosen when the spec is resolved (see fitplan.layout)
    sharding: str = "zero2"
    output_sharding: str = "gather"
    precision: str = "bf16-master"
    optimizer: str = "adamw"
    ac: bool = False
    attention: str | None = None  # None: flex for eagle3, sdpa for sft
    ttt: int = 7
    target_weights: str = "bf16"
    offload: str = "none"
    expandable_segments: bool = False
    aux_layers: tuple[int, ...] | None = None  # None: the draft's or [1, n/2-1, n-4]
    # How the job is run. "specforge" models SpecForge's classic train_eagle3.py runtime.
    runtime: str = "fitplan"
    target_backend: str = "sglang"  # specforge runtime only
    sglang_mem_fraction: float | None = None  # specforge runtime only
    offline: bool = False  # specforge runtime: precomputed hidden states, no live target

    def __post_init__(self) -> None:
        validate(self)

    @property
    def attention_impl(self) -> str:
        return self.attention or ("flex" if self.workload == "eagle3" else "sdpa")

    def replace(self, **changes: Any) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML key names (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["aux_layers"] is not None:
            out["aux_layers"] = list(out["aux_layers"])
        return out


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunSpec))


def validate(spec: RunSpec) -> None:
    if not isinstance(spec.model, str) or not spec.model:
        raise FitplanError("model is required: a profile name, a repo id, or a path to a config.json")
    for name, allowed in CHOICES.items():
        value = getattr(spec, name)
        if value is None and name == "attention":
            continue
        if value not in allowed:
            raise FitplanError(f"{name} {value!r} is not one of: {', '.join(allowed)}")
    for name in POSITIVE_INTS:
        value = getattr(spec, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FitplanError(f"{name} must be a positive integer, got {value!r}")
    if spec.sglang_mem_fraction is not None and not 0 < spec.sglang_mem_fraction < 1:
        raise FitplanError(f"sglang_mem_fraction must be in (0, 1), got {spec.sglang_mem_fraction}")
    if spec.global_batch is not None and spec.global_batch % spec.micro_batch:
        raise FitplanError(
            f"global_batch {spec.global_batch} is not a multiple of micro_batch {spec.micro_batch}"
        )
    if spec.offload == "params" and spec.sharding != "zero3":
        raise FitplanError("offload params needs sharding zero3 (parameters are offloaded per shard)")
    if spec.workload == "sft" and spec.output_sharding == "all-to-all":
        raise FitplanError("output_sharding all-to-all applies to the eagle3 workload's TP target only")


def _coerce(name: str, value: Any) -> Any:
    """YAML gives ints/bools/lists already; CLI strings are converted by typer."""
    if name == "aux_layers" and value is not None:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise FitplanError(f"aux_layers must be a list of layer indices, got {value!r}") from None
    if name in POSITIVE_INTS and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise FitplanError(f"{name} must be a positive integer, got {value!r}") from None
    return value


def spec_from_mapping(values: Mapping[str, Any], source: str = "config") -> RunSpec:
    """Build a RunSpec from YAML-style keys; an unknown key is an error naming it."""
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise FitplanError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELD_NAMES)}"
        )
    if "model" not in values or values["model"] in (None, ""):
        raise FitplanError(f"{source}: 'model' is required")
    kwargs = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return RunSpec(**kwargs)
    except TypeError as exc:  # wrong value types that dataclasses cannot catch
        raise FitplanError(f"{source}: {exc}") from None


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FitplanError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FitplanError(f"{p}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FitplanError(f"{p}: expected a mapping of keys (model: ..., seq: ...), got {type(data).__name__}")
    return data


def load_spec(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """File values, then overrides (CLI flags that were given; None means not given).

    A plan file (fitplan fit -o) holds the configuration under ``config:``; it is accepted too.
    """
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        values = load_yaml_mapping(path)
        if "config" in values and isinstance(values["config"], dict):
            values = dict(values["config"])
        source = str(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return spec_from_mapping(values, source)
