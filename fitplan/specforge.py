"""SpecForge command lines: a `torchrun ... scripts/train_eagle3.py --flags` launch as a RunSpec.

Many users already have a SpecForge launch script. This module reads the classic
`train_eagle3.py` flags (docs/fit.md, "SpecForge jobs") into RunSpec values with `runtime: specforge`,
so the estimator models the job as SpecForge runs it, and turns the fix ladder's changes back
into SpecForge flags. Flags that do not change memory are accepted quietly; flags it does not
know are reported and ignored.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitplan.config import MAX_YAML_BYTES, RunSpec, read_job_file, spec_from_mapping
from fitplan.errors import FitplanError
from fitplan.profiles import _cached_json, _json_files, load_model_config
from fitplan.shell_vars import expand_script, strip_unset, unset_variable

# --attention-backend values -> RunSpec.attention. SpecForge's "fa" (flash attention) saves
# no score matrix, like SDPA, which is how the estimator models it.
ATTENTION = {"flex_attention": "flex", "sdpa": "sdpa", "fa": "sdpa"}

# SpecForge flag -> (RunSpec field, converter)
VALUE_FLAGS: dict[str, tuple[str, Any]] = {
    "--target-model-path": ("model", str),
    "--draft-model-config": ("draft", str),
    "--tp-size": ("tp", int),
    "--batch-size": ("micro_batch", int),
    "--max-length": ("seq", int),
    "--ttt-length": ("ttt", int),
    "--draft-accumulation-steps": ("accum", int),
    "--attention-backend": ("attention", str),
    "--target-model-backend": ("target_backend", str),
    "--sglang-mem-fraction-static": ("sglang_mem_fraction", float),
}
SWITCH_FLAGS = {"--shard-target-output": ("output_sharding", "all-to-all")}
# Offline mode trains on precomputed hidden states instead of running the target live.
OFFLINE_FLAGS = ("--train-hidden-states-path", "--eval-hidden-states-path")

# Flags of train_eagle3.py that do not change GPU memory: accepted without a warning.
QUIET_FLAGS = {
    "--train-data-path", "--eval-data-path", "--output-dir", "--cache-dir", "--chat-template",
    "--num-epochs", "--learning-rate", "--warmup-ratio", "--max-grad-norm", "--log-steps",
    "--save-interval", "--eval-interval", "--seed", "--report-to", "--wandb-project", "--wandb-name",
    "--embedding-key", "--is-preformatted", "--build-dataset-num-proc", "--dist-timeout",
    "--total-steps", "--resume", "--ckpt-dir", "--dataloader-num-workers", "--log-interval",
}
QUIET_SWITCHES = {"--is-preformatted", "--resume"}

# What SpecForge runs, whatever the flags: the draft is one FSDP SHARD_GRAD_OP unit in bf16 with
# BF16Optimizer (fp32 master + AdamW moments), flex attention unless told otherwise.
SPECFORGE_FIXED = {"runtime": "specforge", "workload": "eagle3", "sharding": "zero2", "precision": "bf16-master"}
SPECFORGE_DEFAULTS = {"micro_batch": 1, "seq": 2048, "ttt": 7, "tp": 1, "accum": 1, "attention": "flex"}
DEFAULT_GPU_TYPE = "H100"


@dataclass(frozen=True)
class Unresolved:
    """A value the script takes from a variable it does not set: needed only if no flag gives it."""

    variable: str
    script_flag: str


@dataclass(frozen=True)
class SpecForgeCommand:
    """RunSpec values read from a SpecForge launch, and what was ignored on the way."""

    values: dict[str, Any]
    warnings: tuple[str, ...]

    def spec(self, overrides: dict[str, Any] | None = None) -> RunSpec:
        """The RunSpec; fitplan flags given (e.g. --gpus 8xH200) override the command line."""
        values = {**self.values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        for field, value in values.items():
            if isinstance(value, Unresolved):
                flag = "--gpus COUNTxTYPE" if field == "gpus" else f"--{field.replace('_', '-')}"
                raise FitplanError(
                    f"SpecForge script: {value.script_flag} uses ${value.variable}, which the script does not set "
                    f"(it comes from the environment or a command); set it in the script, or pass {flag}"
                )
        return spec_from_mapping(values, "SpecForge command line")


def read_command(text_or_file: str) -> str:
    """The script text: a file holding it, or the command itself."""
    if "\n" not in text_or_file and len(text_or_file) < 4096:
        path = Path(text_or_file).expanduser()
        if path.is_file():
            return read_job_file(path)
    if len(text_or_file) > MAX_YAML_BYTES:
        raise FitplanError(f"SpecForge command line: {len(text_or_file)} characters is too long for a launch command")
    return text_or_file


def launch_tokens(text: str, marker: str = "train_eagle3", source: str = "SpecForge command line",
                  expected: str = "'torchrun --nproc_per_node 8 scripts/train_eagle3.py --target-model-path ...'",
                  ) -> list[str]:
    """Tokens of the first (continued, uncommented) line of a script that mentions `marker`."""
    joined = re.sub(r"\\\r?\n", " ", text)
    for line in joined.splitlines():
        if marker in line and not line.lstrip().startswith("#"):
            try:
                return shlex.split(line, comments=True)
            except ValueError as exc:
                raise FitplanError(f"{source}: cannot split it into words ({exc})") from None
    raise FitplanError(f"{source}: no {marker} script found; expected e.g. {expected}")


def _split_flags(tokens: list[str], switches: set[str]) -> list[tuple[str, str | None]]:
    """[(flag, value)] from '--flag value', '--flag=value' and value-less switches."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok.startswith("-"):
            continue  # a stray positional (the script name, a value we do not know the flag of)
        if "=" in tok:
            flag, value = tok.split("=", 1)
            pairs.append((flag, value))
        elif tok in switches or i >= len(tokens) or tokens[i].startswith("--"):
            pairs.append((tok, None))
        else:
            pairs.append((tok, tokens[i]))
            i += 1
    return pairs


def launcher_world(launcher: list[str], source: str = "SpecForge command line",
                   ) -> tuple[int | Unresolved, int | Unresolved]:
    """(nodes, GPUs per node) from torchrun's flags; a plain `python script.py` is one GPU."""
    nodes, per_node = 1, 1
    for flag, value in _split_flags(launcher, set()):
        name = flag.replace("_", "-")
        if name in ("--nproc-per-node", "--nnodes") and value is not None:
            variable = unset_variable(value)
            if variable is not None:
                if name == "--nnodes":
                    nodes = Unresolved(variable, flag)
                else:
                    per_node = Unresolved(variable, flag)
                continue
            if not value.isdigit() or int(value) < 1:
                raise FitplanError(f"{source}: torchrun {flag} {value!r} must be a positive integer")
            if name == "--nnodes":
                nodes = int(value)
            else:
                per_node = int(value)
    return nodes, per_node


def resolve_target(path: str, key: str = "--target-model-path", tool: str = "SpecForge") -> str:
    """--target-model-path -> a profile name or a local config; an unresolvable path is an error
    naming `key` (a v0.3 config's model.target_model_path goes through here too)."""
    try:
        profile = load_model_config(path)[0]
    except FitplanError:
        profile = None
    if profile is not None:
        return path if Path(path).expanduser().exists() else profile
    raise FitplanError(
        f"{tool} {key} {path!r} resolves to no model profile and no local config.json; "
        "give a profile name (fitplan profiles), an HF repo id with a profile, or a local model directory"
    )


def resolve_draft(path: str, key: str = "--draft-model-config") -> str:
    """--draft-model-config -> a local file, or the draft profile made from that SpecForge config."""
    if Path(path).expanduser().is_file():
        return path
    basename = Path(path).name
    for name, profile_path in _json_files("drafts").items():
        if basename and basename in str(_cached_json(profile_path).get("source", "")):
            return name
    raise FitplanError(
        f"SpecForge {key} {path!r} is not a local file and matches no draft profile's "
        f"SpecForge config; give the file's path, or drop {'the flag' if key.startswith('--') else key} "
        "to use the target's draft"
    )


def parse_command(text_or_file: str) -> SpecForgeCommand:
    """Read a SpecForge train_eagle3.py launch (a string or a file holding the script)."""
    tokens = launch_tokens(expand_script(read_command(text_or_file)))
    script_at = next(i for i, tok in enumerate(tokens) if "train_eagle3" in tok)
    nodes, per_node = launcher_world(tokens[:script_at])
    values: dict[str, Any] = {**SPECFORGE_FIXED, **SPECFORGE_DEFAULTS}
    values["offline"] = "offline" in tokens[script_at]
    warnings: list[str] = []
    for flag, value in _split_flags(tokens[script_at + 1 :], set(SWITCH_FLAGS) | QUIET_SWITCHES):
        if flag in VALUE_FLAGS:
            values.update(_value(flag, value))
        elif flag in SWITCH_FLAGS:
            field, setting = SWITCH_FLAGS[flag]
            values[field] = setting
        elif flag in OFFLINE_FLAGS:
            values["offline"] = True
        elif flag not in QUIET_FLAGS:
            warnings.append(f"SpecForge flag {flag} is not modelled; ignored")
    if "model" not in values:
        raise FitplanError("SpecForge command line: --target-model-path is missing")
    if isinstance(nodes, Unresolved) or isinstance(per_node, Unresolved):
        values["gpus"] = nodes if isinstance(nodes, Unresolved) else per_node
    else:
        values["gpus"] = f"{per_node}x{DEFAULT_GPU_TYPE}" if nodes == 1 else f"{nodes}x{per_node}x{DEFAULT_GPU_TYPE}"
    return SpecForgeCommand(values=values, warnings=tuple(warnings))


def _value(flag: str, value: str | None) -> dict[str, Any]:
    field, convert = VALUE_FLAGS[flag]
    if value is None:
        raise FitplanError(f"SpecForge flag {flag} needs a value")
    variable = unset_variable(value)
    if variable is not None:
        # $ROOT_DIR/configs/llama3-8B-eagle3.json: the file's name may still name a profile
        rest = strip_unset(value).lstrip("/")
        if field in ("model", "draft") and rest:
            try:
                return _value(flag, rest)
            except FitplanError:
                pass
        return {field: Unresolved(variable, flag)}
    if field == "model":
        return {"model": resolve_target(value)}
    if field == "draft":
        return {"draft": resolve_draft(value)}
    if field == "attention":
        if value not in ATTENTION:
            raise FitplanError(f"SpecForge --attention-backend {value!r} is not one of: {', '.join(ATTENTION)}")
        return {"attention": ATTENTION[value]}
    try:
        return {field: convert(value)}
    except ValueError:
        raise FitplanError(f"SpecForge flag {flag} {value!r} is not a {convert.__name__}") from None


# ---------------------------------------------------------------- ladder changes -> SpecForge flags

FLAG_OF_FIELD = {field: flag for flag, (field, _) in VALUE_FLAGS.items()}
ATTENTION_FLAG_VALUE = {"flex": "flex_attention", "sdpa": "sdpa"}


def flag_changes(before: RunSpec, after: RunSpec) -> list[str]:
    """How to make a SpecForge launch run `after` instead of `before`, one instruction each."""
    out = []
    for field in ("micro_batch", "accum", "tp", "sglang_mem_fraction"):
        old, new = getattr(before, field), getattr(after, field)
        if old != new and new is not None:
            out.append(f"set {FLAG_OF_FIELD[field]} {new}")
    if before.attention_impl != after.attention_impl:
        out.append(f"set --attention-backend {ATTENTION_FLAG_VALUE.get(after.attention_impl, after.attention_impl)}")
    if after.output_sharding == "all-to-all" and before.output_sharding != "all-to-all":
        out.append("add --shard-target-output")
    if after.expandable_segments and not before.expandable_segments:
        out.append("launch with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    return out
