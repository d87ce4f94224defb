"""SpecForge v0.3 run configs (`specforge train -c run.yaml section.field=value`) as a RunSpec.

SpecForge v0.3 replaced the `train_eagle3.py` flags (fitplan/specforge.py) with one typed YAML
run config: `model`, `data`, `training`, `tracking`, `profiling`, `runtime` and `deployment`
sections, every key checked against a schema (unknown keys are errors), and dotted
`section.field=value` overrides on the command line. This module reads such a file, applies the
overrides the way SpecForge does, and turns it into the RunSpec of the job on the TRAINER GPUs
(docs/fit.md, "SpecForge jobs").

Why the job is always `runtime: specforge, offline: true`: in v0.3 no EAGLE3 mode loads the
target transformer on the trainer GPUs. Offline runs (`data.hidden_states_path` set) read the
target's hidden states from disk; online runs must be disaggregated (colocated online training
was removed) and receive the hidden states from SGLang capture servers through Mooncake. Either
way a trainer rank holds the draft (one FSDP SHARD_GRAD_OP unit), the BF16Optimizer state, a
frozen full-vocab lm_head (the TargetHead) and the teacher logits it builds from the target's
final hidden state -- which is what fitplan's offline SpecForge runtime models. The capture
servers run the target on GPUs of their own: managed_local servers are read into
`SpecForgeRun.servers` and estimated apart (fitplan/estimator/capture_server.py); external
server_urls are not, and a warning says so.

Keys that decide trainer memory are read; keys that cannot change it are accepted quietly; keys
that would change it but are not modelled are listed once in a warning; settings fitplan cannot
model at all (another strategy, FULL_SHARD, CPU offload, trainer TP or sequence parallelism) are
refused in one line naming the key.
"""

from __future__ import annotations

import copy
import difflib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from fitplan.config import RunSpec, read_job_file, show, spec_from_mapping, yaml_or_error
from fitplan.errors import FitplanError

DEFAULT_GPU_TYPE = "H100"

# ---------------------------------------------------------------- the schema's keys

# The keys of SpecForge v0.3's run config, section by section, as (kind, default): written from
# specforge/config/schema.py (sgl-project/SpecForge at a6b6b02, "SpecForge v0.3.0"), where every
# section forbids keys it does not declare. A kind ending in "?" may be null; a nested dict is a
# sub-section; a one-element list holds the section of each list entry. Sub-sections in
# NULL_SECTIONS are absent unless the config gives them (so no override can reach inside them).
MODEL: dict[str, Any] = {
    "target_model_path": ("str", None),
    "draft_model_config": ("str?", None),
    "draft_checkpoint_path": ("str?", None),
    "draft_num_hidden_layers": ("int?", None),
    "draft_block_size": ("int?", None),
    "target_backend": ("str", "sglang"),
    "shard_target_output": ("bool", False),
    "input_modality": ("str", "text"),
    "trust_remote_code": ("bool", False),
    "use_liger_kernel": ("bool", False),
    "embedding_key": ("str", "model.embed_tokens.weight"),
    "lm_head_key": ("str", "lm_head.weight"),
    "vocab_mapping_path": ("str", ""),
    "load_target_embedding": ("bool", True),
    "aux_hidden_state_layer_ids": ("list?", None),
    "torch_dtype": ("str", "bfloat16"),
    "cache_dir": ("str?", None),
    "mask_token_id": ("int?", None),
    "tokenizer_pad_token_id": ("int?", None),
    "sglang_attention_backend": ("str", "flashinfer"),
    "sglang_mem_fraction_static": ("float", 0.4),
    "sglang_disable_radix_cache": ("bool", True),
    "sglang_context_length": ("int?", None),
    "sglang_enable_nccl_nvls": ("bool", False),
    "sglang_enable_symm_mem": ("bool", False),
    "sglang_enable_torch_compile": ("bool", False),
    "sglang_enable_dp_attention": ("bool", False),
    "sglang_enable_dp_lm_head": ("bool", False),
    "sglang_ep_size": ("int", 1),
    "sglang_max_running_requests": ("int?", None),
    "sglang_max_total_tokens": ("int?", None),
    "sglang_dp_size": ("int?", None),
    "sglang_moe_a2a_backend": ("str?", None),
    "sglang_moe_runner_backend": ("str?", None),
    "sglang_page_size": ("int?", None),
    "sglang_quantization": ("str?", None),
    "sglang_fp4_gemm_runner_backend": ("str?", None),
    "sglang_mamba_radix_cache_strategy": ("str?", None),
    "sglang_max_mamba_cache_size": ("int?", None),
    "sglang_swa_full_tokens_ratio": ("float?", None),
    "sglang_mamba_full_memory_ratio": ("float?", None),
}
DATA: dict[str, Any] = {
    "train_data_path": ("str", ""),
    "prompts_path": ("str", ""),
    "hidden_states_path": ("str", ""),
    "eval_data_path": ("str", ""),
    "eval_hidden_states_path": ("str", ""),
    "max_length": ("int", 2048),
    "chat_template": ("str", "llama3"),
    "is_preformatted": ("bool", False),
    "train_only_last_turn": ("bool", False),
    "build_dataset_num_proc": ("int", 8),
    "dataloader_num_workers": ("int?", None),
    "cache_dir": ("str", "./cache"),
    "cache_key": ("str?", None),
    "max_prompts": ("int?", None),
}
TRAINING: dict[str, Any] = {
    "strategy": ("str", "eagle3"),
    "num_epochs": ("int", 1),
    "max_steps": ("int?", None),
    "total_steps": ("int?", None),
    "batch_size": ("int", 1),
    "accumulation_steps": ("int", 1),
    "fsdp_sharding": ("str", "SHARD_GRAD_OP"),
    "learning_rate": ("float", 1e-4),
    "lr_scheduler": ("str", "cosine"),
    "warmup_ratio": ("float", 0.015),
    "max_grad_norm": ("float", 0.5),
    "optimizer_cpu_offload": ("bool", False),
    "ttt_length": ("int", 7),
    "attention_backend": ("str", "flex_attention"),
    "tp_size": ("int", 1),
    "sp_ulysses_size": ("int", 1),
    "sp_ring_size": ("int", 1),
    "dist_timeout": ("int", 10),
    "lk_loss_type": ("str?", None),
    "kl_scale": ("float", 1.0),
    "kl_decay": ("float", 1.0),
    "num_anchors": ("int", 512),
    "loss_decay_gamma": ("float?", None),
    "objective_chunk_blocks": ("int", 128),
    "loss_type": ("str", "dflash"),
    "dpace_alpha": ("float", 0.5),
    "lambda_base_start": ("float", 1.0),
    "lambda_base_decay_ratio": ("float", 0.5),
    "dspark_ce_loss_alpha": ("float", 0.1),
    "dspark_l1_loss_alpha": ("float", 0.9),
    "dspark_confidence_head_alpha": ("float", 1.0),
    "num_depths": ("int", 8),
    "down_sample_ratio": ("float", 0.8),
    "down_sample_ratio_min": ("float", 0.2),
    "norm_before_residual": ("bool?", None),
    "save_interval": ("int", 0),
    "eval_interval": ("int", 0),
    "log_interval": ("int", 50),
    "max_checkpoints": ("int", 0),
    "compact_teacher": ("bool", False),
    "compact_teacher_chunk_size": ("int?", None),
    "resume_from": ("str?", None),
    "role": ("str", "all"),
    "seed": ("int", 42),
    "prompt_seed": ("int?", None),
}
TRACKING: dict[str, Any] = {
    "report_to": ("str", "none"),
    **{key: ("str?", None) for key in (
        "wandb_project", "wandb_name", "wandb_key", "wandb_dir", "swanlab_project", "swanlab_name",
        "swanlab_key", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name")},
    "wandb_offline": ("bool", False),
}
PROFILING: dict[str, Any] = {
    "enabled": ("bool", False),
    "start_step": ("int", 30),
    "num_steps": ("int", 4),
    "record_shapes": ("bool", False),
}
RUNTIME: dict[str, Any] = {
    "producer_lease": ("int", 8),
    "producer_concurrency": ("int", 1),
    "in_flight_high_watermark": ("int", 256),
    "in_flight_low_watermark": ("int", 192),
    "resident_high_watermark_bytes": ("int?", None),
    "resident_low_watermark_bytes": ("int?", None),
    "feature_store_max_resident_bytes": ("int?", None),
}
MOONCAKE: dict[str, Any] = {
    "rpc_port": ("int", 35551),
    "metadata_port": ("int", 35880),
    "metrics_port": ("int", 35903),
    "local_hostname": ("str", "127.0.0.1"),
    "protocol": ("str", "tcp"),
    "rdma_devices": ("str?", None),
    "global_segment_size_bytes": ("int", 32 << 30),
    "local_buffer_size_bytes": ("int", 1 << 30),
    "startup_timeout_s": ("float", 60.0),
}
CAPTURE_SERVER: dict[str, Any] = {
    "port": ("int", None),
    "cuda_visible_devices": ("list", None),
    "tp_size": ("int", 1),
    "mem_fraction_static": ("float?", None),
    "attention_backend": ("str?", None),
    "startup_timeout_s": ("float", 1800.0),
}
MANAGED_LOCAL: dict[str, Any] = {
    "trainer_cuda_visible_devices": ("list", None),
    "mooncake": MOONCAKE,
    "capture_servers": [CAPTURE_SERVER],
    "shutdown_grace_s": ("float", 30.0),
}
DISAGGREGATED: dict[str, Any] = {
    "control_dir": ("str", None),
    "consumer_state_dir": ("str?", None),
    "inbox_server_url": ("str?", None),
    "backend": ("str", None),
    "store_root": ("str?", None),
    "store_id": ("str?", None),
    "server_urls": ("list", []),
    **{key: ("str?", None) for key in (
        "mooncake_metadata_server", "mooncake_master_server_addr", "mooncake_local_hostname",
        "mooncake_protocol", "mooncake_rdma_devices")},
    "producer_segment_size": ("int?", None),
    "client_buffer_size": ("int", 256 << 20),
    "idle_timeout_s": ("float?", None),
    "peer_wait_timeout_s": ("float?", None),
    "producer_hold_s": ("float?", None),
    "shutdown_grace_s": ("float", 30.0),
    "managed_local": MANAGED_LOCAL,
}
TRAINER: dict[str, Any] = {
    "nnodes": ("int", 1),
    "nproc_per_node": ("int", 1),
    "node_rank": ("int?", None),
    "master_addr": ("str?", None),
    "master_port": ("int", 29500),
}
DEPLOYMENT: dict[str, Any] = {
    "mode": ("str", "local_colocated"),
    "trainer": TRAINER,
    "disaggregated": DISAGGREGATED,
}
SCHEMA: dict[str, Any] = {
    "model": MODEL,
    "data": DATA,
    "training": TRAINING,
    "tracking": TRACKING,
    "profiling": PROFILING,
    "runtime": RUNTIME,
    "deployment": DEPLOYMENT,
    "run_id": ("str", "specforge-run"),
    "output_dir": ("str", "./output"),
}
NULL_SECTIONS = {"deployment.disaggregated", "deployment.disaggregated.managed_local"}
# Keys SpecForge still reads from `training` and moves into `deployment` when it loads a file
# (its migrate_legacy_config); an override cannot name them.
LEGACY_TRAINING_KEYS = ("deployment_mode", "server_urls", "metadata_db_path")

# What fitplan does with each key. READ: decides the RunSpec. IGNORED: would change trainer (or
# server) memory but fitplan does not model it: listed in one warning when set to anything but
# SpecForge's default. Every other key (paths, schedules, logging, seeds, other strategies'
# knobs, Mooncake and launcher settings) cannot change the trainer's memory: accepted quietly.
READ = {
    "model.target_model_path", "model.draft_model_config", "model.aux_hidden_state_layer_ids",
    "data.max_length", "data.hidden_states_path",
    "training.strategy", "training.batch_size", "training.accumulation_steps", "training.ttt_length",
    "training.attention_backend", "training.fsdp_sharding", "training.optimizer_cpu_offload",
    "training.tp_size", "training.sp_ulysses_size", "training.sp_ring_size",
    "deployment.mode", "deployment.trainer.nnodes", "deployment.trainer.nproc_per_node",
}
IGNORED_PREFIXES = ("model.sglang_", "runtime.")
IGNORED = {
    "model.torch_dtype", "model.draft_num_hidden_layers", "training.compact_teacher",
    "training.compact_teacher_chunk_size", "training.objective_chunk_blocks", "training.lk_loss_type",
}

# training.attention_backend -> RunSpec.attention. "fa" (flash attention) keeps no score matrix,
# which is how the estimator models SDPA; "usp" (sequence parallel) is refused.
ATTENTION = {"flex_attention": "flex", "sdpa": "sdpa", "fa": "sdpa", "eager": "eager"}
# Settings fitplan refuses, with the value it models.
NOT_MODELLED = {
    "training.fsdp_sharding": "SHARD_GRAD_OP",
    "training.optimizer_cpu_offload": False,
    "training.tp_size": 1,
    "training.sp_ulysses_size": 1,
    "training.sp_ring_size": 1,
}
# Exactly one is set: hidden states (offline) or prompts for the capture servers (online).
DATA_SOURCES = ("data.train_data_path", "data.prompts_path", "data.hidden_states_path")
NOT_MODELLED_TAIL = "is not modelled yet for SpecForge v0.3 jobs"

# ---------------------------------------------------------------- detection


def is_v03_config(data: Any) -> bool:
    """A SpecForge v0.3 run config: `model:` is a mapping holding `target_model_path`, next to a
    `data:`, `training:` or `deployment:` mapping. A fitplan config's `model:` is a string and a
    plan keeps its job under `config:`, so neither matches."""
    if not isinstance(data, dict) or "fitplan_plan" in data:
        return False
    model = data.get("model")
    return (isinstance(model, dict) and "target_model_path" in model
            and any(isinstance(data.get(section), dict) for section in ("data", "training", "deployment")))


def v03_mapping(text: str, source: str | Path = "config") -> dict[str, Any] | None:
    """The file's mapping if `text` is a SpecForge v0.3 run config, else None (not YAML at all, a
    fitplan config, a plan, a launch script)."""
    if "target_model_path" not in text:  # cheap: most job files never mention it
        return None
    try:
        data = yaml_or_error(text, source)
    except FitplanError:
        return None
    return data if is_v03_config(data) else None


# ---------------------------------------------------------------- keys and values


def _section(path: str) -> Any:
    """The schema entry at a dotted path (list entries are walked through), or None."""
    node: Any = SCHEMA
    for key in path.split("."):
        if isinstance(node, list):
            node = node[0]
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _unknown_key(path: str, key: str, schema: dict[str, Any], source: str) -> FitplanError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, list(schema), n=1)
    hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
    known = (f"; {path or 'the top level'} takes: {', '.join(schema)}" if len(schema) <= 12
             else f"; {path} takes {len(schema)} keys, listed in SpecForge's specforge/config/schema.py")
    return FitplanError(
        f"{source}: unknown key {where}: SpecForge v0.3 refuses keys its schema does not declare{hint}{known}"
    )


def _check_keys(node: Any, schema: dict[str, Any], path: str, source: str) -> None:
    """Every key of `node` is one `schema` declares; the first one that is not is an error."""
    if node is None:  # `training:` with nothing under it; a null sub-section is absent
        return
    if not isinstance(node, dict):
        raise FitplanError(f"{source}: {path} must be a mapping of keys, got {show(node)}")
    for key, value in node.items():
        if path == "training" and key in LEGACY_TRAINING_KEYS:
            continue
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(path, show(key, 40) if not isinstance(key, str) else key, schema, source)
        entry = schema[key]
        where = f"{path}.{key}" if path else key
        if isinstance(entry, dict):
            _check_keys(value, entry, where, source)
        elif isinstance(entry, list):
            if not isinstance(value, list):
                raise FitplanError(f"{source}: {where} must be a list of mappings, got {show(value)}")
            for i, item in enumerate(value):
                _check_keys(item, entry[0], f"{where}[{i}]", source)


def _migrate_legacy(raw: dict[str, Any], source: str) -> None:
    """training.deployment_mode / server_urls / metadata_db_path -> deployment.*, as SpecForge does
    when it loads a file."""
    training = raw.get("training")
    if not isinstance(training, dict) or not any(k in training for k in LEGACY_TRAINING_KEYS):
        return
    mode = training.pop("deployment_mode", None)
    urls = training.pop("server_urls", None)
    database = training.pop("metadata_db_path", None)
    deployment = raw.setdefault("deployment", {})
    if not isinstance(deployment, dict):
        return
    if mode is not None:
        if deployment.get("mode") not in (None, mode):
            raise FitplanError(f"{source}: deployment.mode {deployment['mode']!r} conflicts with the legacy "
                               f"training.deployment_mode {mode!r}")
        deployment["mode"] = mode
    elif deployment.get("mode") is None and (urls or database):
        deployment["mode"] = "disaggregated"
    if urls is not None or database:
        if deployment.get("disaggregated") is None:
            deployment["disaggregated"] = {}
        if isinstance(deployment["disaggregated"], dict) and urls is not None:
            deployment["disaggregated"]["server_urls"] = urls


_TRUE = {"true", "yes", "on", "1", "t", "y"}
_FALSE = {"false", "no", "off", "0", "f", "n"}
_INT = re.compile(r"[+-]?\d{1,18}")


def _typed(where: str, value: Any, kind: str, source: str) -> Any:
    """A value as SpecForge's schema would take it (pydantic's lax mode: "8" is 8, "true" is True),
    or a one-line error naming the key."""
    base = kind.rstrip("?")
    if value is None:
        if kind.endswith("?"):
            return None
        raise FitplanError(f"{source}: {where} must be given a value, got null")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise FitplanError(f"{source}: {where} must be true or false, got {show(value)}")
    if base == "int":
        if isinstance(value, bool):
            raise FitplanError(f"{source}: {where} must be an integer, got {show(value)}")
        if isinstance(value, float) and value.is_integer() and abs(value) < 1 << 62:
            return int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, int):
            return value
        raise FitplanError(f"{source}: {where} must be an integer, got {show(value)}")
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise FitplanError(f"{source}: {where} must be a number, got {show(value)}")
    if base == "list":
        if isinstance(value, list):
            return value
        raise FitplanError(f"{source}: {where} must be a list, got {show(value)}")
    if isinstance(value, str):
        return value
    raise FitplanError(f"{source}: {where} must be a string, got {show(value)}")


# ---------------------------------------------------------------- overrides

OVERRIDE_FORM = "accepted: section.field=value naming a key of SpecForge v0.3's config, e.g. training.batch_size=2"


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], source: str) -> None:
    """`section.field=value` items applied to `raw` in place, as `specforge train` does: split on the
    first '=', the path must already exist (a section left null cannot be reached into, a list
    entry cannot be indexed), a value starting with '[' or '{' is read as YAML, a string field
    keeps its text, and any other scalar is read as a YAML scalar for the schema's typing."""
    for item in overrides:
        if "=" not in item:
            raise FitplanError(f"SpecForge override {item!r} has no '='; {OVERRIDE_FORM}")
        path, text = item.split("=", 1)
        keys = path.split(".")
        if not path or any(not key for key in keys):
            raise FitplanError(f"SpecForge override {item!r} names no field before '='; {OVERRIDE_FORM}")
        node: Any = raw
        schema: Any = SCHEMA
        for depth, key in enumerate(keys):
            here = ".".join(keys[: depth + 1])
            if not isinstance(schema, dict) or key not in schema:
                known = schema if isinstance(schema, dict) else {}
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {'.'.join(keys[:depth] + [close[0]])}?)" if close else ""
                raise FitplanError(f"SpecForge override path {path!r} does not exist: "
                                   f"{here} is not a key of SpecForge v0.3's config{hint}; {OVERRIDE_FORM}")
            entry = schema[key]
            if depth == len(keys) - 1:
                node[key] = _override_value(entry, text)
                break
            if not isinstance(entry, dict):
                what = (f"a list, whose entries cannot be indexed (replace it whole: {here}=[...])"
                        if isinstance(entry, list) or entry[0].startswith("list") else "a value, not a section")
                raise FitplanError(f"SpecForge override path {path!r} does not exist: {here} is {what}; "
                                   f"{OVERRIDE_FORM}")
            if node.get(key) is None:
                if here in NULL_SECTIONS:
                    raise FitplanError(f"SpecForge override path {path!r} does not exist: {here} is not set "
                                       f"in the config, and an override cannot create it; {OVERRIDE_FORM}")
                node[key] = {}
            if not isinstance(node[key], dict):
                raise FitplanError(f"{source}: {here} must be a mapping of keys, got {show(node[key])}")
            node, schema = node[key], entry


def _override_value(entry: Any, text: str) -> Any:
    if isinstance(entry, tuple) and entry[0].rstrip("?") == "str":
        return text  # a string field keeps the text, as pydantic does
    if text.lstrip().startswith(("[", "{")):
        return _yaml_value(text)
    if not text.strip():
        return text
    value = _yaml_value(text)
    return text if isinstance(value, (list, dict)) else value


def _yaml_value(text: str) -> Any:
    return yaml_or_error(text, f"SpecForge override value {show(text, 40)}")


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class ManagedServer:
    """One kind of managed_local SGLang capture server, as SpecForge launches it
    (launch_plan.py's _managed_local_services): `count` servers of `tp` GPUs each, run with
    --mem-fraction-static `mem_fraction` (the server's own, else model.sglang_mem_fraction_static),
    --context-length `context_length` (model.sglang_context_length, else data.max_length + 7) and
    --max-total-tokens `max_total_tokens` (model.sglang_max_total_tokens; None: not passed)."""

    tp: int
    mem_fraction: float
    count: int
    context_length: int
    max_total_tokens: int | None = None


@dataclass(frozen=True)
class SpecForgeRun:
    """The RunSpec of a SpecForge v0.3 run's trainer GPUs, and what reading it warned about;
    `servers`: its managed capture servers, one entry per kind (none offline or with external
    server_urls)."""

    spec: RunSpec
    warnings: tuple[str, ...]
    servers: tuple[ManagedServer, ...] = ()
    # an online run: capture servers stream the features, none are stored
    online: bool = False
    # the user's mapping with their overrides applied (before SpecForge's legacy-key migration),
    # and where it came from: what `fit -o` rewrites
    mapping: dict = field(default_factory=dict, repr=False, compare=False)
    source: str = ""


def _get(raw: dict[str, Any], path: str, source: str) -> Any:
    """The typed value at a dotted path, SpecForge's default when not given."""
    node: Any = raw
    for key in path.split(".")[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    leaf = path.split(".")[-1]
    kind, default = _section(path)
    if not isinstance(node, dict) or leaf not in node:
        return default
    return _typed(path, node[leaf], kind, source)


def _set_paths(node: Any, schema: Any, path: str = "") -> Iterable[tuple[str, Any, Any]]:
    """(dotted path, value, schema entry) of every value the config gives, in the schema's order."""
    if not isinstance(node, dict) or not isinstance(schema, dict):
        return
    for key, entry in schema.items():
        if key not in node:
            continue
        value = node[key]
        where = f"{path}.{key}" if path else key
        if isinstance(entry, dict):
            yield from _set_paths(value, entry, where)
        elif isinstance(entry, tuple):
            yield where, value, entry


def _ignored(raw: dict[str, Any], source: str) -> list[str]:
    """The keys that would change memory, are not modelled, and are set to a non-default value."""
    out = []
    for where, value, (kind, default) in _set_paths(raw, SCHEMA):
        if where in IGNORED or where.startswith(IGNORED_PREFIXES):
            try:
                value = _typed(where, value, kind, source)
            except FitplanError:
                pass  # SpecForge refuses it anyway; fitplan only reports it
            if value != default:
                out.append(where)
    return out


def _refusals(raw: dict[str, Any], source: str) -> None:
    strategy = _get(raw, "training.strategy", source)
    if strategy != "eagle3":
        raise FitplanError(f"{source}: training.strategy {strategy!r}: fitplan models EAGLE3 drafts only "
                           "(accepted: eagle3)")
    for key, modelled in NOT_MODELLED.items():
        value = _get(raw, key, source)
        if value != modelled:
            shown = str(value).lower() if isinstance(value, bool) else value
            accepted = str(modelled).lower() if isinstance(modelled, bool) else modelled
            raise FitplanError(f"{source}: {key} {shown} {NOT_MODELLED_TAIL} (accepted: {accepted})")
    attention = _get(raw, "training.attention_backend", source)
    if attention == "usp":
        raise FitplanError(f"{source}: training.attention_backend usp (sequence parallel) {NOT_MODELLED_TAIL} "
                           f"(accepted: {', '.join(ATTENTION)})")
    if attention not in ATTENTION:
        raise FitplanError(f"{source}: training.attention_backend {show(attention)} is not one of: "
                           f"{', '.join(ATTENTION)}, usp")


def _deployment(raw: dict[str, Any], offline: bool, source: str) -> list[str]:
    """Check the mode; a warning for the capture servers of an online run."""
    mode = _get(raw, "deployment.mode", source)
    if mode not in ("local_colocated", "disaggregated"):
        raise FitplanError(f"{source}: deployment.mode {show(mode)} is not one of: local_colocated, disaggregated")
    disaggregated = (raw.get("deployment") or {}).get("disaggregated")
    if mode == "disaggregated" and not isinstance(disaggregated, dict):
        raise FitplanError(f"{source}: deployment.mode disaggregated needs a deployment.disaggregated section")
    if mode != "disaggregated" and disaggregated is not None:
        raise FitplanError(f"{source}: deployment.disaggregated is set but deployment.mode is {mode}; "
                           "SpecForge takes it with deployment.mode disaggregated only")
    if offline:
        return []
    if mode != "disaggregated":
        raise FitplanError(f"{source}: an online run (no data.hidden_states_path) needs deployment.mode "
                           "disaggregated: SpecForge v0.3 removed colocated online training")
    managed = disaggregated.get("managed_local")
    if isinstance(managed, dict):
        servers = managed.get("capture_servers") or []
        if not isinstance(servers, list):
            servers = []
        tps = [_typed(f"deployment.disaggregated.managed_local.capture_servers[{i}].tp_size",
                      s.get("tp_size", 1), "int", source) for i, s in enumerate(servers) if isinstance(s, dict)]
        default_fraction = _get(raw, "model.sglang_mem_fraction_static", source)
        fractions = sorted({s.get("mem_fraction_static") or default_fraction for s in servers if isinstance(s, dict)})
        n = len(tps)
        what = (f"{n} managed, tp {'+'.join(map(str, tps))} on {sum(tps)} GPU{'s' if sum(tps) != 1 else ''}, "
                f"mem_fraction_static {', '.join(map(str, fractions))}")
        return [f"capture servers ({what}) run the target outside this estimate of the trainer GPUs; "
                "they are estimated separately (the capture servers block, \"server\" in --json) from "
                "SGLang's documented memory sizing, not calibrated against a measurement"]
    else:
        urls = _typed("deployment.disaggregated.server_urls", disaggregated.get("server_urls", []), "list", source)
        what = (f"{len(urls)} external, at deployment.disaggregated.server_urls, tp set where they are launched"
                if urls else "not named in this config")
    return [f"capture servers ({what}) run the target outside this estimate: "
            "SGLang capture servers are not estimated yet; the estimate is of the trainer GPUs"]


def _managed_servers(raw: dict[str, Any], source: str) -> tuple[ManagedServer, ...]:
    """The managed_local capture servers of an online disaggregated run, grouped by (tp,
    mem_fraction_static) in first-seen order; () when there are none."""
    disaggregated = (raw.get("deployment") or {}).get("disaggregated")
    managed = disaggregated.get("managed_local") if isinstance(disaggregated, dict) else None
    if not isinstance(managed, dict) or not isinstance(managed.get("capture_servers"), list):
        return ()
    default_fraction = _get(raw, "model.sglang_mem_fraction_static", source)
    context = _get(raw, "model.sglang_context_length", source)
    if context is None:
        context = _positive(raw, "data.max_length", source) + 7  # SpecForge's derived --context-length
    max_total = _get(raw, "model.sglang_max_total_tokens", source)
    counts: dict[tuple[int, float], int] = {}
    for i, server in enumerate(managed["capture_servers"]):
        if not isinstance(server, dict):
            continue
        where = f"deployment.disaggregated.managed_local.capture_servers[{i}]"
        tp = _typed(f"{where}.tp_size", server.get("tp_size", 1), "int", source)
        fraction = server.get("mem_fraction_static")
        fraction = default_fraction if fraction is None else _typed(f"{where}.mem_fraction_static", fraction,
                                                                    "float", source)
        if tp < 1 or not 0 < fraction <= 1:
            raise FitplanError(f"{source}: {where}: tp_size must be a positive integer and mem_fraction_static "
                               f"in (0, 1], got tp_size {tp}, mem_fraction_static {fraction}")
        counts[(tp, fraction)] = counts.get((tp, fraction), 0) + 1
    return tuple(ManagedServer(tp, fraction, n, context, max_total) for (tp, fraction), n in counts.items())


def _gpus(nodes: int, per_node: int, flag: str | None) -> tuple[str, list[str]]:
    """RunSpec.gpus for the trainer ranks: their count from the config, the type from --gpus."""
    from fitplan.profiles import MAX_GPUS_PER_NODE, MAX_NODES, parse_gpus

    for key, count, most in (("nnodes", nodes, MAX_NODES), ("nproc_per_node", per_node, MAX_GPUS_PER_NODE)):
        if count > most:
            raise FitplanError(f"deployment.trainer.{key} {count} is out of range: accepted at most {most}")
    warnings = []
    world = nodes * per_node
    if flag is None:
        gpu_type = DEFAULT_GPU_TYPE
        warnings.append(f"a SpecForge config names no GPU type: {DEFAULT_GPU_TYPE} assumed "
                        f"(give another with --gpus, e.g. --gpus {world}xH200)")
    else:
        cluster = parse_gpus(flag)
        gpu_type = gpu_type_of(flag)
        if gpu_type != flag.strip() and (cluster.nodes, cluster.gpus_per_node) != (nodes, per_node):
            warnings.append(
                f"--gpus {flag}: its count is ignored; the config trains on {world} GPU{'s' if world != 1 else ''} "
                f"(deployment.trainer.nnodes {nodes} x nproc_per_node {per_node}; change them with "
                f"deployment.trainer.nproc_per_node=N)"
            )
    return (f"{per_node}x{gpu_type}" if nodes == 1 else f"{nodes}x{per_node}x{gpu_type}"), warnings


def gpu_type_of(gpus: str) -> str:
    """The GPU type of a --gpus value: `H200` of `8xH200`, `2x8xH200` or `H200`."""
    counts = re.match(r"\s*((?:[+-]?\d+\s*[xX×]\s*){0,2})(.*)", gpus, re.DOTALL)
    return counts.group(2).strip()


def read_config(mapping: Mapping[str, Any], source: str, overrides: Iterable[str] = (),
                flags: Mapping[str, Any] | None = None) -> SpecForgeRun:
    """The trainer GPUs' job of a SpecForge v0.3 run config (its parsed mapping), with
    `section.field=value` overrides applied; fitplan flags given (None: not given) override the
    result, except --gpus, whose GPU type is used and whose count the config decides."""
    from fitplan.specforge import resolve_draft, resolve_target

    raw = copy.deepcopy(dict(mapping))
    _migrate_legacy(raw, source)
    _check_keys(raw, SCHEMA, "", source)
    overrides = list(overrides)
    if overrides:
        apply_overrides(raw, overrides, source)
        _check_keys(raw, SCHEMA, "", source)
    if not is_v03_config(raw):
        raise FitplanError(f"{source}: model.target_model_path is required in a SpecForge v0.3 config")

    _refusals(raw, source)
    warnings: list[str] = []
    sources = [key for key in DATA_SOURCES if _get(raw, key, source)]
    if len(sources) != 1:
        raise FitplanError(f"{source}: set exactly one of {', '.join(DATA_SOURCES)} (SpecForge v0.3 reads one "
                           f"data source; {'none is' if not sources else ' and '.join(sources) + ' are'} set)")
    offline = sources == ["data.hidden_states_path"]
    warnings += _deployment(raw, offline, source)

    target = _get(raw, "model.target_model_path", source)
    values: dict[str, Any] = {
        "model": resolve_target(target, key="model.target_model_path"),
        "workload": "eagle3",
        "runtime": "specforge",
        "offline": True,
        "target_backend": "sglang",
        "sharding": "zero2",
        "precision": "bf16-master",
        "optimizer": "adamw",
        "offload": "none",
        "tp": 1,
        "seq": _positive(raw, "data.max_length", source),
        "micro_batch": _positive(raw, "training.batch_size", source),
        "accum": _positive(raw, "training.accumulation_steps", source),
        "ttt": _positive(raw, "training.ttt_length", source),
        "attention": ATTENTION[_get(raw, "training.attention_backend", source)],
    }
    draft = _get(raw, "model.draft_model_config", source)
    if draft is not None and (Path(draft).expanduser() / "config.json").is_file():
        draft = str(Path(draft).expanduser() / "config.json")  # SpecForge also takes the directory
    values["draft"] = "auto" if draft is None else resolve_draft(draft, key="model.draft_model_config")
    aux = _get(raw, "model.aux_hidden_state_layer_ids", source)
    if aux is not None:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in aux):
            raise FitplanError(f"{source}: model.aux_hidden_state_layer_ids must be a list of layer numbers, "
                               f"got {show(aux)}")
        values["aux_layers"] = tuple(aux)
    nodes = _positive(raw, "deployment.trainer.nnodes", source)
    per_node = _positive(raw, "deployment.trainer.nproc_per_node", source)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values["gpus"], gpu_warnings = _gpus(nodes, per_node, flags.pop("gpus", None))
    warnings += gpu_warnings
    ignored = _ignored(raw, source)
    if ignored:
        warnings.append(f"ignored (not modelled by fitplan): {', '.join(ignored)}")
    values.update(flags)
    servers = () if offline else _managed_servers(raw, source)
    as_given = copy.deepcopy(dict(mapping))
    apply_overrides(as_given, overrides, source)
    return SpecForgeRun(spec=spec_from_mapping(values, source), warnings=tuple(warnings), servers=servers,
                        online=not offline, mapping=as_given, source=source)


def _positive(raw: dict[str, Any], path: str, source: str) -> int:
    value = _get(raw, path, source)
    if value < 1:
        raise FitplanError(f"{source}: {path} must be a positive integer, got {value}")
    return value


# ---------------------------------------------------------------- --from-specforge "run.yaml k=v ..."


def read_text(text: str, source: str, flags: Mapping[str, Any] | None = None) -> SpecForgeRun | None:
    """A job file's text as a SpecForge v0.3 run, or None when it is not one."""
    mapping = v03_mapping(text, source)
    return None if mapping is None else read_config(mapping, source, (), flags)


def from_specforge_value(value: str, flags: Mapping[str, Any] | None = None) -> SpecForgeRun | None:
    """`--from-specforge "run.yaml training.batch_size=2 data.max_length=16384"`: a SpecForge v0.3
    config file followed by its overrides (split like a shell does). None when the value is not
    a v0.3 config (a train_eagle3.py launch command, or a file holding one)."""
    if "\n" in value or len(value) >= 4096:
        return None
    whole = Path(value).expanduser()
    if whole.is_file():  # a path with spaces, given alone
        return read_text(read_job_file(whole), str(whole), flags)
    try:
        words = shlex.split(value)
    except ValueError:
        return None
    if not words:
        return None
    first = Path(words[0]).expanduser()
    looks_yaml = first.suffix.lower() in (".yaml", ".yml", ".json")
    if not first.is_file():
        if looks_yaml:
            read_job_file(first)  # the one-line "does not exist" error naming it
        return None
    text = read_job_file(first)
    mapping = v03_mapping(text, str(first))
    if mapping is None:
        if looks_yaml:
            raise FitplanError(
                f"--from-specforge {words[0]}: not a SpecForge v0.3 run config (a mapping with model.target_model_path "
                "and a data, training or deployment section); give a fitplan config as CONFIG instead"
            )
        return None  # e.g. scripts/train_eagle3.py of a SpecForge checkout: a launch command
    return read_config(mapping, str(first), words[1:], flags)


# fitplan field -> the run config key a user sets for it (`specforge train -c run.yaml KEY=VALUE`)
KEY_OF_FIELD = {"micro_batch": "training.batch_size", "accum": "training.accumulation_steps"}
ATTENTION_VALUE = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}


def key_changes(before: RunSpec, after: RunSpec) -> list[str]:
    """How to make a v0.3 run config run `after` instead of `before`: its own keys, as overrides."""
    out = [f"{key}={getattr(after, field)}" for field, key in KEY_OF_FIELD.items()
           if getattr(before, field) != getattr(after, field) and getattr(after, field) is not None]
    if before.attention_impl != after.attention_impl:
        out.append(f"training.attention_backend={ATTENTION_VALUE[after.attention_impl]}")
    if after.expandable_segments and not before.expandable_segments:
        out.append("launch with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    return out
