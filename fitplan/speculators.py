"""vLLM speculators' trainer read into a job: its `scripts/train.py` flags (a command line or a script
holding one) or the `run.yaml` it writes beside its checkpoints (docs/fit.md, "speculators jobs").

speculators generates its flags from one typed schema (src/speculators/train/config/schema.py):
every field is `--field-name`, booleans that default to true (or to "derived") take `--x/--no-x`,
the other booleans are switches, lists take one or more values; `--config run.yaml` layers a YAML
file (keys nested by group, under a top-level `train:`) beneath the flags, and the hidden-states
backends add their own flags. This module reads all of that the way its argparse parser does
(values typed, choices checked, unique prefixes of a flag accepted), refuses what it would
refuse, and names the job: the verifier (as a fitplan profile), one packed sequence of
`--total-seq-len` tokens per step, the TTT unroll, the draft vocabulary, the GPUs and how the
draft is replicated or sharded.

The job becomes a RunSpec under runtime speculators (fitplan/estimator/speculators_runtime.py says
what one of its GPUs holds): the draft speculators builds from the verifier (`draft_shape`) with the
vocabulary it would prune to, DDP or FSDP2 (`--fsdp-shard`), Muon or AdamW, and, when the launch
script leaves a vLLM server running on the trainer's GPUs (fitplan/vllm_server.py), that server's
gpu_memory_utilization. What the estimate does not model is refused naming the flag (a deeper
draft, another loss implementation, a trained embedding, a draft from a saved config); fields that
change no GPU memory it models are listed once as ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitplan.config import (
    RunSpec,
    read_job_file,
    show,
    spec_from_mapping,
    yaml_or_error,
)
from fitplan.errors import FitplanError
from fitplan.layout import AUX_LAYER_COUNT
from fitplan.shapes import DraftShape, ModelShape

SOURCE = "speculators command line"
DEFAULT_GPU_TYPE = "H100"

# ---------------------------------------------------------------- the schema

# group -> field -> (kind, default). Kinds: "str", "int", "float", "ints" (one or more),
# "switch" (a flag that sets true), "bool" (--x / --no-x), or a tuple of the accepted values.
# Written from speculators' schema.py and the file and mooncake hidden-states backends
# (hs_connectors/transfer.py) at vllm-project/speculators c05b95b.
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "": {"speculator_type": ("str", "eagle3"), "dry_run": ("switch", False), "seed": ("int", 42),
         "deterministic_cuda": ("switch", False)},
    "verifier": {"verifier_name_or_path": ("str", ""), "trust_remote_code": ("switch", False)},
    "draft": {
        "from_pretrained": ("str", ""), "draft_config": ("str", ""), "num_layers": ("int", None),
        "draft_arch": (("llama", "qwen3"), None), "draft_hidden_act": ("str", "silu"),
        "draft_mrope_full_head_hack": ("bool", True), "target_layer_ids": ("ints", None),
        "token_freq_path": ("str", None), "draft_vocab_size": ("int", None), "d2t_path": ("str", None),
        "t2d_path": ("str", None), "mask_token_id": ("int", None), "norm_before_residual": ("bool", True),
        "embed_requires_grad": ("bool", False), "norm_before_fc": ("bool", None), "fc_norm": ("switch", False),
        "norm_output": ("bool", None), "sliding_window": ("int", 2048), "full_attention_indices": ("ints", []),
        "sliding_window_non_causal": ("switch", False),
        "draft_attn_impl": (("simple_flex_attention", "sdpa", "eager"), "simple_flex_attention"),
    },
    "data": {
        "data_path": ("str", "./output"), "hidden_states_backend": (("file", "mooncake"), "file"),
        "total_seq_len": ("int", 8192), "train_data_ratio": ("float", 0.9), "noise_std": ("float", 0.05),
        "hidden_states_dtype": ("str", "bfloat16"), "num_workers": ("int", 12), "prefetch_factor": ("int", 4),
        "max_anchors": ("int", 512),
    },
    "generation": {
        "vllm_endpoint": ("str", "http://localhost:8000/v1"),
        "on_missing": (("generate", "skip", "warn", "raise"), "generate"),
        "on_generate": (("cache", "delete"), "delete"), "request_timeout": ("float", 180.0),
        "max_retries": ("int", 3),
    },
    "loss": {"loss_implementation": (("fused", "eager"), "fused"), "loss_fn": ("str", None),
             "ttt_steps": ("int", 3), "ttt_step_loss_decay": ("float", 1.0)},
    "optimizer": {
        "optimizer": (("adamw", "muon"), "muon"), "lr": ("float", 1e-4), "weight_decay": ("float", 0.01),
        "muon_lr": ("float", None), "muon_momentum": ("float", 0.95), "muon_weight_decay": ("float", 0.1),
        "muon_ns_steps": ("int", 5), "muon_adjust_lr_fn": (("original", "match_rms_adamw"), "match_rms_adamw"),
    },
    "scheduler": {
        "scheduler_type": (("linear", "cosine", "none"), "linear"), "scheduler_warmup_steps": ("int", None),
        "scheduler_warmup_ratio": ("float", None), "scheduler_total_steps": ("int", None),
        "scheduler_num_cosine_cycles": ("float", 0.5),
    },
    "trainer": {
        "epochs": ("int", 20), "checkpoint_freq": ("float", 1.0), "save_best": ("switch", False),
        "no_resume_from_checkpoint": ("switch", False), "log_freq": ("int", 1),
        "save_path": ("str", "./output/checkpoints"), "fsdp_shard": ("switch", False), "max_steps": ("int", None),
    },
    "logging": {"logger": ("str", ""), "log_dir": ("str", "./logs"), "run_name": ("str", None)},
    "dflash": {"block_size": ("int", None), "sample_from_anchor": ("bool", None), "dflash_decay_gamma": ("float", 4.0),
               "per_position_loss_weight": (("fixed-exp-decay", "dpace"), None), "dpace_alpha": ("float", 0.5)},
    "dspark": {"markov_rank": ("int", 256), "markov_head_type": (("vanilla", "gated", "rnn"), "vanilla"),
               "enable_confidence_head": ("bool", True), "confidence_head_with_markov": ("bool", True),
               "confidence_head_alpha": ("float", 1.0)},
    "peagle": {"num_depths": ("int", 8), "down_sample_ratio": ("float", 0.7), "down_sample_ratio_min": ("float", 0.2)},
    "mtp": {"num_speculative_steps": ("int", 3), "step_weight_beta": ("float", 0.6)},
    # the hidden-states backends' own flags; a run.yaml keeps them under `backend:`
    "backend": {
        "hidden_states_path": ("str", None), "mooncake_master": ("str", "127.0.0.1:50051"),
        "mooncake_metadata_server": ("str", "P2PHANDSHAKE"), "mooncake_protocol": (("tcp", "rdma"), "tcp"),
        "mooncake_global_segment_gib": ("float", 4.0), "mooncake_local_buffer_gib": ("float", 2.0),
    },
}
FIELDS: dict[str, tuple[str, Any, Any]] = {
    name: (group, kind, default) for group, fields in SCHEMA.items() for name, (kind, default) in fields.items()
}
# the parser's own flags besides the schema's
PARSER_FLAGS = {"--config": "str", "--dump-config": "switch"}
SPECULATOR_TYPES = ("eagle3", "dflash", "dspark", "peagle", "mtp")


def _flags() -> dict[str, tuple[str, bool]]:
    """Every flag train.py takes -> (field, the value a bare --x / --no-x sets)."""
    out = {}
    for name, (_, kind, _) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        out[flag] = (name, True)
        if kind == "bool":
            out["--no-" + flag[2:]] = (name, False)
    return out


FLAGS = _flags()
ALL_FLAGS = sorted([*FLAGS, *PARSER_FLAGS])


# ---------------------------------------------------------------- values


def typed(name: str, value: Any, where: str) -> Any:
    """A value as speculators' schema takes it (a flag's text, or a YAML value), or a one-line error."""
    _, kind, _ = FIELDS[name]
    if value is None:
        return None
    if isinstance(kind, tuple):
        if value not in kind:
            raise FitplanError(f"{where}: {show(value)} is not one of: {', '.join(kind)}")
        return value
    if kind in ("switch", "bool"):  # pydantic's lax booleans, as a run.yaml may spell them
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise FitplanError(f"{where} must be true or false, got {show(value)}")
    if kind == "ints":
        items = value if isinstance(value, list) else [value]
        return [_number(int, v, where) for v in items]
    if kind in ("int", "float"):
        return _number(int if kind == "int" else float, value, where)
    return str(value)


def _number(kind: type, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise FitplanError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {show(value)}")
    if isinstance(value, (int, float)) and (kind is float or isinstance(value, int)):
        return kind(value)
    if isinstance(value, str) and len(value) <= 40:
        try:
            return kind(value)
        except ValueError:
            pass
    raise FitplanError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {show(value)}")


# ---------------------------------------------------------------- flags


def _flag_of(token: str) -> str | None:
    """The flag a token names: itself, or the one flag it is a prefix of (argparse's
    abbreviations); None when it names none."""
    if token in FLAGS or token in PARSER_FLAGS:
        return token
    matches = [f for f in ALL_FLAGS if f.startswith(token)] if len(token) > 2 else []
    if len(matches) > 1:
        raise FitplanError(f"{SOURCE}: {token} is ambiguous: it could be {', '.join(matches[:6])}")
    return matches[0] if matches else None


def _is_value(token: str) -> bool:
    """A token argparse takes as a value: not a flag (a negative number is a value)."""
    if not token.startswith("-") or token == "-":
        return True
    try:
        float(token)
        return True
    except ValueError:
        return False


def parse_flags(tokens: list[str]) -> tuple[dict[str, Any], str | None]:
    """{field: typed value} of the flags given, and --config's path if given."""
    values: dict[str, Any] = {}
    config = None
    unknown = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if _is_value(token):
            raise FitplanError(f"{SOURCE}: unexpected argument {show(token)}; train.py takes no positional arguments")
        name, _, inline = token.partition("=")
        flag = _flag_of(name)
        if flag is None:
            unknown.append(name)
            while i < len(tokens) and _is_value(tokens[i]):
                i += 1  # its values, if any
            continue
        kind = PARSER_FLAGS.get(flag) or FIELDS[FLAGS[flag][0]][1]
        given, i = _flag_values(flag, kind, [inline] if "=" in token else [], tokens, i)
        if flag == "--config":
            config = given[0]
        elif flag in FLAGS:
            name, setting = FLAGS[flag]
            raw = setting if kind in ("switch", "bool") else (given if kind == "ints" else given[0])
            values[name] = typed(name, raw, f"{SOURCE}: {flag}")
    if unknown:
        raise FitplanError(f"{SOURCE}: unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           "speculators' train.py takes the flags of its schema (docs/cli/train.md in "
                           "vllm-project/speculators)" + _hint(unknown[0]))
    return values, config


def _flag_values(flag: str, kind: Any, given: list[str], tokens: list[str], i: int) -> tuple[list[str], int]:
    """The values a flag takes from `tokens[i:]` (after any `--flag=value`), and where the next
    flag starts: one for a value flag, one or more for a list, none for a switch."""
    if kind in ("switch", "bool"):
        if given:
            raise FitplanError(f"{SOURCE}: {flag} takes no value (a switch), got {show(given[0])}")
        return given, i
    while i < len(tokens) and _is_value(tokens[i]) and (kind == "ints" or not given):
        given.append(tokens[i])
        i += 1
    if not given:
        raise FitplanError(f"{SOURCE}: {flag} needs a value")
    return given, i


def _hint(token: str) -> str:
    close = difflib.get_close_matches(token, ALL_FLAGS, n=1)
    return f"; did you mean {close[0]}?" if close else ""


# ---------------------------------------------------------------- run.yaml


def yaml_values(data: Any, source: str) -> dict[str, Any]:
    """{field: typed value} of a run.yaml (groups under `train:`, or bare). Keys outside the
    schema are skipped, as speculators skips them (with a warning; it refuses none)."""
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise FitplanError(f"{source}: a speculators run.yaml is a mapping (its groups under 'train:')")
    values: dict[str, Any] = {}
    for key, node in data.items():
        if key in SCHEMA and key and isinstance(node, dict):
            for name, value in node.items():
                if isinstance(name, str) and FIELDS.get(name, ("",))[0] == key:
                    values[name] = typed(name, value, f"{source}: {key}.{name}")
        elif isinstance(key, str) and FIELDS.get(key, ("x",))[0] == "":
            values[key] = typed(key, node, f"{source}: {key}")
    return values


def is_run_yaml(data: Any) -> bool:
    """speculators' run.yaml: `train:` holding its groups (or a bare mapping with a `verifier:` group)."""
    if not isinstance(data, dict):
        return False
    body = data.get("train") if isinstance(data.get("train"), dict) else data
    return isinstance(body.get("verifier"), dict) and "verifier_name_or_path" in body["verifier"]


def run_yaml_mapping(text: str, source: str) -> dict | None:
    """The mapping of `text` if it is a speculators run.yaml, else None."""
    if "verifier_name_or_path" not in text:
        return None
    try:
        data = yaml_or_error(text, source)
    except FitplanError:
        return None
    return data if is_run_yaml(data) else None


def is_launch(text: str) -> bool:
    """A speculators train.py launch (a command line or a script): an uncommented line, once
    continuations are joined, that runs train.py (or `speculators train`) with a verifier."""
    if "--verifier-name-or-path" not in text:
        return False
    lines = re.sub(r"\\\r?\n", " ", text).splitlines()
    return any(not line.lstrip().startswith("#") and "--verifier-name-or-path" in line
               and ("train.py" in line or "speculators train" in line) for line in lines)


# ---------------------------------------------------------------- the job

# What fitplan reads of a job; every other field given is listed once as ignored (it changes no
# GPU memory fitplan models: learning rates, epochs, paths, logging, the other algorithms' groups).
MODELLED = {
    "speculator_type", "verifier_name_or_path", "total_seq_len", "ttt_steps", "draft_vocab_size", "d2t_path",
    "t2d_path", "data_path", "target_layer_ids", "optimizer", "fsdp_shard", "draft_attn_impl", "num_layers",
    "hidden_states_dtype", "loss_implementation", "embed_requires_grad", "from_pretrained", "draft_config",
    "on_missing",
}
# draft_attn_impl -> fitplan's attention
ATTENTION = {"simple_flex_attention": "flex", "sdpa": "sdpa", "eager": "eager"}
# Refused: what the estimate does not model -> (the values it takes, what it estimates, the flag
# that says so).
UNMODELLED = {
    "num_layers": ((None, 1), "a draft of one decoder layer (speculators' Eagle3 default)", "--num-layers 1"),
    "hidden_states_dtype": (("bfloat16",), "bf16 autocast over bf16 hidden states", "--hidden-states-dtype bfloat16"),
    "loss_implementation": (("fused",), "the fused Triton loss, which keeps no [T, Vd] tensor of its own",
                            "--loss-implementation fused"),
    "embed_requires_grad": ((False,), "a frozen embedding", "--no-embed-requires-grad"),
    "from_pretrained": ((None, ""), "the draft speculators builds from the verifier, not a saved draft's config",
                        "leave --from-pretrained out"),
    "draft_config": ((None, ""), "the draft speculators builds from the verifier, not a given decoder config",
                     "leave --draft-config out"),
}


@dataclass(frozen=True)
class SpeculatorsRun:
    """What a speculators train command or run.yaml says, every field typed (`get` fills the
    schema's defaults), the verifier as a fitplan model, the GPUs, the co-located vLLM server's
    gpu_memory_utilization (None: none shares the trainer's GPUs), and what reading it ignored
    or assumed."""

    values: dict[str, Any]
    gpus: str
    server_fraction: float | None = None
    warnings: tuple[str, ...] = ()

    def get(self, name: str) -> Any:
        return self.values.get(name, FIELDS[name][2])

    def describe(self) -> str:
        ids = self.get("target_layer_ids")
        vocab = self.values.get("draft_vocab")
        online = self.get("on_missing") == "generate"
        parallel = "FSDP2" if self.get("fsdp_shard") else "DDP"
        return (f"eagle3 draft of {self.values['model']}, {self.get('total_seq_len')} packed tokens a step, "
                f"ttt {self.get('ttt_steps')}, aux layers {ids}, draft vocab {vocab or 'full'}, {self.gpus}"
                f"{'' if self.gpus.startswith('1x') else ' ' + parallel}, {self.get('optimizer')}, hidden states "
                + ("from vLLM when not cached" if online else "from files"))

    def spec(self, overrides: Mapping[str, Any] | None = None) -> RunSpec:
        """The RunSpec under runtime speculators; fitplan flags given override it, except --gpus,
        whose type is already in `gpus` (the count is the launch's)."""
        values = {
            "model": self.values["model"], "draft": draft_ref(self.values.get("draft_vocab")), "gpus": self.gpus,
            "workload": "eagle3", "runtime": "speculators", "seq": self.get("total_seq_len"), "micro_batch": 1,
            "ttt": self.get("ttt_steps"), "aux_layers": self.get("target_layer_ids"),
            "sharding": "zero3" if self.get("fsdp_shard") else "none", "precision": "fp32-autocast",
            "optimizer": self.get("optimizer"), "attention": ATTENTION[self.get("draft_attn_impl")], "tp": 1,
            "offline": True, "vllm_gpu_memory_utilization": self.server_fraction,
        }
        given = {k: v for k, v in (overrides or {}).items() if v is not None and k != "gpus"}
        return spec_from_mapping({**values, **given}, SOURCE)


def read(value: str, flags: Mapping[str, Any] | None = None) -> SpeculatorsRun:
    """`--from-speculators VALUE`: a train.py command line, or a file holding a launch script or a
    run.yaml. The launch gives the GPU count and fitplan's --gpus the type; a run.yaml records no
    GPU count, so --gpus gives both."""
    from fitplan.specforge import read_command

    text = read_command(value)
    source = value if "\n" not in value and len(value) < 4096 and Path(value).expanduser().is_file() else SOURCE
    return from_text(text, source, flags)


def from_config_text(text: str, source: str, flags: Mapping[str, Any] | None = None) -> SpeculatorsRun | None:
    """The job of a CONFIG's text if it is a speculators launch or run.yaml, else None."""
    if is_launch(text) or run_yaml_mapping(text, source) is not None:
        return from_text(text, source, flags)
    return None


def from_text(text: str, source: str, flags: Mapping[str, Any] | None = None) -> SpeculatorsRun:
    """A run.yaml's or a launch's text (a CONFIG file's, or --from-speculators')."""
    mapping = run_yaml_mapping(text, source)
    if mapping is None:
        return _from_launch(text, flags)
    return _run(yaml_values(mapping, source), _world_of((flags or {}).get("gpus")), flags, None)


def _world_of(gpus: str | None) -> tuple[int, int]:
    from fitplan.profiles import parse_gpus

    cluster = parse_gpus(gpus or f"1x{DEFAULT_GPU_TYPE}")
    return cluster.nodes, cluster.gpus_per_node


def _from_launch(text: str, flags: Mapping[str, Any] | None) -> SpeculatorsRun:
    from fitplan.shell_vars import expand_script
    from fitplan.specforge import launch_tokens, launcher_world

    expanded = expand_script(text)
    marker = "train.py" if "train.py" in expanded else "speculators"
    if marker not in expanded and expanded.lstrip().startswith("--"):  # the flags alone: one GPU
        tokens, at = launch_tokens("speculators " + expanded, marker, SOURCE), 0
    else:
        tokens = launch_tokens(expanded, marker, SOURCE,
                               "'torchrun --nproc_per_node 4 scripts/train.py --verifier-name-or-path ...'")
        at = next(i for i, tok in enumerate(tokens) if marker in tok)
    if marker == "speculators" and at + 1 < len(tokens) and tokens[at + 1] == "train":
        at += 1  # `speculators train --flags`
    world = launcher_world(tokens[:at], SOURCE)
    values, config = parse_flags(tokens[at + 1:])
    if config is not None:  # the flags layer over --config's file
        values = {**yaml_values(yaml_or_error(read_job_file(config), config), config), **values}
    return _run(values, world, flags, expanded)


def _run(values: dict[str, Any], world: tuple, flags: Mapping[str, Any] | None, script: str | None) -> SpeculatorsRun:
    """Check what the job needs, resolve the verifier, the draft vocabulary and the GPUs, and
    whether a vLLM server of the script shares them."""
    from fitplan.profiles import load_model
    from fitplan.specforge import resolve_target
    from fitplan.vllm_server import colocation

    kind = values.get("speculator_type", "eagle3")
    if kind not in SPECULATOR_TYPES:
        raise FitplanError(f"{SOURCE}: --speculator-type {show(kind)} is not one of speculators' types: "
                           f"{', '.join(SPECULATOR_TYPES)}")
    if kind != "eagle3":
        raise FitplanError(f"{SOURCE}: --speculator-type {kind}: fitplan models EAGLE3 drafts only (accepted: eagle3)")
    verifier = values.get("verifier_name_or_path")
    if not verifier:
        raise FitplanError(f"{SOURCE}: --verifier-name-or-path is missing (speculators requires it)")
    model = resolve_target(verifier, key="--verifier-name-or-path", tool="speculators")
    for name in ("total_seq_len", "ttt_steps", "draft_vocab_size", "num_layers"):
        if values.get(name) is not None and values[name] < 1:
            raise FitplanError(f"{SOURCE}: --{name.replace('_', '-')} must be a positive integer, got {values[name]}")
    _refuse_unmodelled(values)
    verifier_shape = load_model(model)
    vocab, vocab_note = draft_vocab(values, verifier_shape.vocab)
    warnings = [vocab_note] + ignored_warning(values)
    fraction, server_note = colocation(script) if script is not None else (None, None)
    warnings += [server_note] if server_note else []
    ids = values.get("target_layer_ids") or default_aux(verifier_shape.layers)
    if len(ids) != AUX_LAYER_COUNT:
        raise FitplanError(f"{SOURCE}: --target-layer-ids {' '.join(map(str, ids))}: fitplan models a draft over "
                           f"{AUX_LAYER_COUNT} verifier layers (accepted: {AUX_LAYER_COUNT} ids)")
    values = {**values, "model": model, "target_layer_ids": ids, "draft_vocab": vocab}
    return SpeculatorsRun(values, _gpus(world, (flags or {}).get("gpus")), fraction, tuple(warnings))


def _refuse_unmodelled(values: dict[str, Any]) -> None:
    for name, (modelled, what, accepted) in UNMODELLED.items():
        value = values.get(name, FIELDS[name][2])
        if value not in modelled:
            flag = "--" + name.replace("_", "-")
            raise FitplanError(f"{SOURCE}: {flag} {show(value)}: not modelled; fitplan estimates {what} "
                               f"(accepted: {accepted})")


def ignored_warning(values: dict[str, Any]) -> list[str]:
    """One line naming every field given that the estimate does not read."""
    ignored = sorted(name for name in values if name not in MODELLED)
    if not ignored:
        return []
    flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
    return [f"speculators flags fitplan does not model (ignored): {flags}"]


def default_aux(layers: int) -> list[int]:
    """speculators' default aux layers of an n-layer verifier: [2, n // 2, n - 3]."""
    return [2, layers // 2, layers - 3]


def _gpus(world: tuple, flag: str | None) -> str:
    """The launch's GPU count with --gpus's type (H100 when not given)."""
    from fitplan.specforge import Unresolved
    from fitplan.specforge_yaml import gpu_type_of

    nodes, per_node = world
    for count in (nodes, per_node):
        if isinstance(count, Unresolved):
            if flag is None:
                raise FitplanError(f"{SOURCE}: {count.script_flag} uses ${count.variable}, which the script does not "
                                   "set; set it in the script, or pass --gpus COUNTxTYPE")
            return flag
    gpu_type = DEFAULT_GPU_TYPE if flag is None else gpu_type_of(flag)
    return f"{per_node}x{gpu_type}" if nodes == 1 else f"{nodes}x{per_node}x{gpu_type}"


# ---------------------------------------------------------------- the draft vocabulary


def draft_vocab(values: dict[str, Any], verifier_vocab: int) -> tuple[int | None, str]:
    """The draft vocabulary as speculators' train.py picks it (None: the verifier's), and a line
    saying where it came from. Its order: d2t/t2d files named by flag, then d2t.npy/t2d.npy in
    --data-path, then --draft-vocab-size with token frequencies; with none of them the full
    vocabulary. fitplan reads a d2t file's length where the file is on this machine."""
    given = values.get("draft_vocab_size")
    named = values.get("d2t_path")
    local = Path(str(values.get("data_path", FIELDS["data_path"][2]))).expanduser() / "d2t.npy"
    path = Path(named).expanduser() if named else (local if local.is_file() else None)
    length = npy_length(path) if path is not None and path.is_file() else None
    if length is not None:
        if given is not None and given != length:
            raise FitplanError(f"{SOURCE}: --draft-vocab-size {given} does not match {path}, which maps {length} "
                               "tokens (speculators refuses the pair)")
        return _vocab(length, verifier_vocab), f"draft vocabulary: {length} tokens, the length of {path}"
    if named and given is None:
        raise FitplanError(f"{SOURCE}: --d2t-path {named}: fitplan cannot read that file here, so the draft "
                           "vocabulary is unknown; give --draft-vocab-size N too")
    if given is not None:
        return _vocab(given, verifier_vocab), (f"draft vocabulary: --draft-vocab-size {given} (speculators prunes "
                                               "to it given token frequencies or d2t/t2d files in --data-path)")
    return None, (f"draft vocabulary: the verifier's full {verifier_vocab} tokens (no --draft-vocab-size and no "
                  "d2t.npy found in --data-path, where speculators looks for a mapping)")


def _vocab(n: int, verifier_vocab: int) -> int | None:
    if n > verifier_vocab:
        raise FitplanError(f"{SOURCE}: a draft vocabulary of {n} tokens exceeds the verifier's {verifier_vocab}")
    return None if n == verifier_vocab else n


def npy_length(path: Path) -> int | None:
    """The first dimension of a .npy file, read from its header (no numpy), or None if it is no
    .npy file."""
    import ast

    try:
        with path.open("rb") as f:
            head = f.read(10)
            if head[:6] != b"\x93NUMPY":
                return None
            size = int.from_bytes(head[8:10], "little") if head[6] == 1 else int.from_bytes(head[8:10] + f.read(2),
                                                                                            "little")
            header = ast.literal_eval(f.read(min(size, 4096)).decode("latin-1"))
        shape = header.get("shape") if isinstance(header, dict) else None
        return int(shape[0]) if isinstance(shape, tuple) and shape and isinstance(shape[0], int) else None
    except (OSError, ValueError, SyntaxError, IndexError):
        return None


# ---------------------------------------------------------------- the draft runtime speculators trains


def draft_ref(vocab: int | None) -> str:
    """RunSpec.draft of a speculators job: its draft, with the vocabulary it is pruned to."""
    return "speculators" if vocab is None else f"speculators:{vocab}"


def draft_shape(ref: str, model: ModelShape, aux_layers: tuple[int, ...] | None) -> DraftShape:
    """The Eagle3 draft speculators' train.py builds from the verifier's config (its
    create_transformer_layer_config): one Llama decoder layer with the verifier's hidden size,
    attention heads and head size (heads re-derived as hidden // head_dim when the heads do not
    split hidden), the verifier's intermediate_size (3 x hidden when it has none), and an lm_head
    over the draft vocabulary. Which of its weights train is the runtime's business
    (fitplan/estimator/speculators_runtime.py)."""
    h, heads, kv_heads = model.hidden, model.heads, model.kv_heads
    head_dim = model.raw.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0 and h % heads and h % head_dim == 0:
        heads = h // head_dim
        kv_heads = kv_heads if heads % kv_heads == 0 else heads
    return DraftShape(
        name=f"{model.name}-speculators-eagle3",
        hidden=h,
        intermediate=model.intermediate if "intermediate_size" in model.raw else 3 * h,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=model.head_dim,
        vocab=model.vocab,
        draft_vocab=_vocab_of_ref(ref, model.vocab),
        target_hidden=h,
        aux_layers=tuple(aux_layers or default_aux(model.layers)),
    )


def _vocab_of_ref(ref: str, verifier_vocab: int) -> int:
    if ref in ("auto", "speculators"):
        return verifier_vocab
    name, _, count = ref.partition(":")
    if name == "speculators" and count.isdigit() and len(count) < 10 and 1 <= int(count) <= verifier_vocab:
        return int(count)
    raise FitplanError(f"draft {show(ref)}: runtime speculators trains the draft speculators builds from the "
                       "verifier; accepted: auto or speculators (the full vocabulary), or speculators:N (pruned to "
                       f"N tokens, 1 to {verifier_vocab})")
