"""`fitplan fit -o` for a SpecForge v0.3 run config: the user's file with the plan's keys changed.

The answer is the user's own mapping (with the `section.field=value` overrides they gave applied),
where only the keys that must change for the plan, and for the managed capture servers to fit
(fitplan/server_fit.py), are set, through the same override path SpecForge's schema walk uses
(fitplan/specforge_yaml.py), so no key the schema does not declare is ever added. The result is
read back as SpecForge would read it and must give the plan's job exactly, with capture servers
that fit; a plan that needs something the run config has no key for (the allocator's expandable
segments are an environment variable) is refused and nothing is written. The file is written
with PyYAML: the original's comments and key quoting are not kept.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

from fitplan.config import FIELD_NAMES, RunSpec, show
from fitplan.errors import FitplanError
from fitplan.specforge_yaml import ATTENTION_VALUE, SpecForgeRun, apply_overrides, read_config

# fitplan field -> the run config key that sets it
WRITTEN = {
    "micro_batch": "training.batch_size",
    "accum": "training.accumulation_steps",
    "seq": "data.max_length",
    "ttt": "training.ttt_length",
    "attention": "training.attention_backend",
    "aux_layers": "model.aux_hidden_state_layer_ids",
}
# A field SpecForge's run config cannot set, and how the user says they do it another way.
NO_KEY = {
    "expandable_segments": ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, an environment variable",
                            "--expandable-segments"),
}


def fitted_mapping(run: SpecForgeRun, plan: RunSpec, flags: Mapping[str, Any],
                   path: Path | str = "", servers: Any = None) -> tuple[dict[str, Any], list[str]]:
    """The run config that trains `plan` (to be written to `path`), and the overrides that made it
    from the user's; `servers` (fitplan.server_fit.ServerFix): the capture servers' changes, whose
    servers, read back, must fit."""
    rest = _unwritten_flags(flags)
    current = read_config(run.mapping, run.source, (), rest).spec
    overrides = [f"{WRITTEN[field]}={_value(plan, field)}" for field in WRITTEN
                 if _setting(current, field) != _setting(plan, field)]
    if servers is not None:
        overrides += servers.overrides
    mapping = copy.deepcopy(run.mapping)
    apply_overrides(mapping, overrides, run.source)
    check = read_config(mapping, run.source, (), rest)
    missing = _differences(check.spec, plan)
    if missing:
        raise FitplanError(_refusal(missing, plan, path))
    if servers is not None:
        servers.check_written(check, path)
    return mapping, overrides


def write_run_config(run: SpecForgeRun, plan: RunSpec, flags: Mapping[str, Any], path: Path,
                     servers: Any = None) -> list[str]:
    """Write the fitted run config to `path` (checked writable before the search); its changes."""
    mapping, overrides = fitted_mapping(run, plan, flags, path, servers)
    header = (f"# fitplan fit from {run.source}: {'; '.join(overrides) or 'no changes'}\n"
              "# (rewritten by PyYAML: the original's comments are not kept)\n")
    try:
        Path(path).write_text(header + yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True))
    except OSError as exc:
        raise FitplanError(f"cannot write the run config to {path}: {exc.strerror}") from None
    return overrides


# fitplan flags that describe what a run config does not hold: the GPU type (the config has only
# counts) and the allocator's environment the user launches with.
OUTSIDE_THE_CONFIG = ("gpus", "expandable_segments")


def _unwritten_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Those flags, applied to both readings; any other flag that changes the job must be
    written as a key, or the plan is refused naming it."""
    return {k: v for k, v in flags.items() if v is not None and k in OUTSIDE_THE_CONFIG}


def _setting(spec: RunSpec, field: str) -> Any:
    return spec.attention_impl if field == "attention" else getattr(spec, field)


def _value(spec: RunSpec, field: str) -> str:
    if field == "attention":
        return ATTENTION_VALUE[spec.attention_impl]
    value = getattr(spec, field)
    return f"[{', '.join(map(str, value))}]" if field == "aux_layers" else str(value)


def _differences(check: RunSpec, plan: RunSpec) -> list[str]:
    """Fields where the written config's job is not the plan's. The plan may pin its global batch
    (the ladder keeps it while trading micro-batch for accumulation); the config gives it as
    batch_size x trainer GPUs x accumulation_steps."""
    from fitplan.profiles import parse_gpus

    out = []
    for name in FIELD_NAMES:
        if getattr(check, name) == getattr(plan, name):
            continue
        if name == "global_batch" and check.global_batch is None:
            if check.micro_batch * parse_gpus(check.gpus).world * (check.accum or 1) == plan.global_batch:
                continue
        out.append(name)
    return out


def _refusal(fields: list[str], plan: RunSpec, path: Path | str) -> str:
    """One line: what cannot be written, and what to do instead."""
    no_key = [name for name in fields if name in NO_KEY]
    if no_key:
        what = "; ".join(NO_KEY[name][0] for name in no_key)
        flags = " ".join(NO_KEY[name][1] for name in no_key)
        return (f"fit -o {path}: the plan needs {what}, which SpecForge v0.3's run config has no key for; "
                f"nothing written; if you launch with it, say so with {flags} and fit again")
    what = "; ".join(f"{name} {show(getattr(plan, name))}" for name in fields)
    return (f"fit -o {path}: {what}: given as fitplan flags, which -o does not write into a SpecForge run "
            "config; nothing written; set them in the run config, or as its section.field=value overrides "
            "inside --from-specforge")
