"""Profiles: model shapes, Eagle3 draft shapes and GPU specs, from JSON.

The researched profiles ship inside the package (``fitplan.profiles_data``, the repository's
``profiles/`` folder). A user can point ``--model`` / ``--draft`` at any HF-style config.json
(or a directory holding one), and add GPUs or models in ``$FITPLAN_PROFILES`` (a folder laid
out like ``profiles/``). Unknown JSON fields are ignored; missing required ones are named.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fitplan.errors import FitplanError
from fitplan.shapes import DraftShape, ModelShape
from fitplan.units import GIB

REQUIRED_MODEL_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


# ---------------------------------------------------------------- where profiles live


def _profile_dirs() -> list[Path]:
    dirs = []
    extra = os.environ.get("FITPLAN_PROFILES")
    if extra:
        dirs.append(Path(extra))
    dirs.append(_packaged_profiles())
    return dirs


def _packaged_profiles() -> Path:
    """Installed: the wheel's fitplan.profiles_data. Run from a source tree: ../profiles."""
    try:
        return Path(str(resources.files("fitplan.profiles_data")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "profiles"


def _json_files(kind: str) -> dict[str, Path]:
    """name -> path for every profile of a kind ("models" or "drafts"); user files win."""
    folders = tuple(d / kind for d in reversed(_profile_dirs()))
    # A folder's mtime changes when a file is added or removed: the listing is cached until then.
    return dict(_listing(tuple((f, f.stat().st_mtime_ns if f.is_dir() else None) for f in folders)))


@lru_cache(maxsize=64)
def _listing(folders: tuple[tuple[Path, int | None], ...]) -> tuple[tuple[str, Path], ...]:
    found: dict[str, Path] = {}
    for folder, mtime in folders:
        if mtime is not None:
            for p in sorted(folder.glob("*.json")):
                found[p.stem] = p
    return tuple(found.items())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FitplanError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise FitplanError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise FitplanError(f"{path}: expected a JSON object")
    return data


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    lookup = {k.lower(): k for k in known}
    if close:
        return "did you mean " + ", ".join(lookup[c] for c in close) + "?"
    return "known: " + ", ".join(sorted(known))


# ---------------------------------------------------------------- models


def _int(d: dict, *keys: str, default: int | None = None) -> int | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return default


def _first_set(d: dict, *keys: str):
    return next((d[k] for k in keys if d.get(k) is not None), None)


def model_shape_from_config(cfg: dict[str, Any], name: str, source: str) -> ModelShape:
    """Read an HF config.json (or a profile with the same keys) into a ModelShape."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma 3): the LM part
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k in REQUIRED_MODEL_KEYS}}
    missing = [k for k in REQUIRED_MODEL_KEYS if _int(cfg, k) is None]
    if missing:
        raise FitplanError(f"{source}: missing required field(s) {', '.join(missing)}")
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    values = dict(
        hidden=hidden,
        layers=_int(cfg, "num_hidden_layers"),
        heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", "head_dim_effective", default=hidden // heads if heads else 0),
        vocab=_int(cfg, "vocab_size"),
        intermediate=_int(cfg, "intermediate_size", default=4 * hidden),
        max_positions=_int(cfg, "max_position_embeddings"),
    )
    bad = [k for k, v in values.items() if k != "max_positions" and (v is None or v <= 0)]
    if bad:
        raise FitplanError(f"{source}: field(s) {', '.join(bad)} must be positive integers")
    experts = _int(cfg, "num_local_experts", "n_routed_experts", "num_experts", default=0) or 0
    quant = cfg.get("quantization_config") or {}
    mla = cfg.get("mla") if isinstance(cfg.get("mla"), dict) else None
    return ModelShape(
        name=name,
        model_type=str(cfg.get("model_type", "unknown")),
        # Research profiles record HF's default (tied for Gemma) as tie_word_embeddings_effective.
        tie_embeddings=bool(_first_set(cfg, "tie_word_embeddings", "tie_word_embeddings_effective")),
        attention_bias=bool(cfg.get("attention_bias", False)),
        experts=experts,
        experts_per_token=_int(cfg, "num_experts_per_tok", "experts_per_token", default=0) or 0,
        expert_intermediate=(
            _int(cfg, "moe_intermediate_size", default=None) or values["intermediate"] if experts else 0
        ),
        shared_experts=_int(cfg, "n_shared_experts", default=0) or 0,
        dense_layers=_int(cfg, "first_k_dense_replace", default=0) or 0,
        packed_format=quant.get("quant_method") if quant.get("quant_method") == "mxfp4" else None,
        final_logit_softcap=cfg.get("final_logit_softcapping") is not None,
        mla_attention_params=_mla_params(cfg, hidden, heads) if mla or cfg.get("kv_lora_rank") else None,
        raw=cfg,
        **values,
    )


def _mla_params(cfg: dict, hidden: int, heads: int) -> int:
    """DeepSeek multi-head latent attention: parameters of one layer's attention block."""
    src = {**cfg, **(cfg.get("mla") or {})}
    q_rank = _int(src, "q_lora_rank", default=1536)
    kv_rank = _int(src, "kv_lora_rank", default=512)
    nope = _int(src, "qk_nope_head_dim", default=128)
    rope = _int(src, "qk_rope_head_dim", default=64)
    v_dim = _int(src, "v_head_dim", default=128)
    q = hidden * q_rank + q_rank + q_rank * heads * (nope + rope)
    kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
    return q + kv + heads * v_dim * hidden


def model_names() -> list[str]:
    return sorted(_json_files("models"))


# Checkpoint variants with the base model's shapes: chat/instruction tuning, pre-trained, base.
_VARIANT = re.compile(r"-(instruct|it|pt|base|chat)(?=-|$)")


def same_shape_key(ref: str) -> str:
    """A model's name without its org or variant: 'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'.

    Older Meta repos spell the name 'Meta-Llama-3.1-8B-Instruct'.
    """
    name = ref.rstrip("/").split("/")[-1].lower()
    return _VARIANT.sub("", re.sub(r"^meta-(?=llama)", "", name))


def _repo_ids() -> dict[str, str]:
    """Same-shape key of every HF repo a profile names (hf_repo field) and of its name -> profile."""
    ids: dict[str, str] = {}
    for name, path in _json_files("models").items():
        ids[same_shape_key(name)] = name
        repo = str(_cached_json(path).get("hf_repo", ""))
        for token in re.findall(r"[\w.-]+/[\w.-]+", repo):
            ids[same_shape_key(token)] = name
    return ids


@lru_cache(maxsize=None)
def _cached_json(path: Path) -> dict[str, Any]:
    return _read_json(path)


def _config_path(ref: str) -> Path | None:
    p = Path(ref).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FitplanError(f"{ref}: directory has no config.json")
        return cfg
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise FitplanError(f"{ref}: file does not exist")
        return p
    return None


def load_model_config(ref: str) -> tuple[str, dict[str, Any], str]:
    """(name, raw HF-style config, source) for a profile name, repo id, config.json or directory."""
    path = _config_path(ref)
    if path is not None:
        name = path.parent.name if path.name == "config.json" else path.stem
        return name, _read_json(path), str(path)
    files = _json_files("models")
    key = ref.lower()
    by_lower = {k.lower(): k for k in files}
    name = by_lower.get(key)
    if name is None:  # an HF repo id or a variant of one (-Instruct, -it, -pt, -Base)
        name = _repo_ids().get(same_shape_key(ref))
    if name is None:
        raise FitplanError(
            f"unknown model {ref!r}: {_suggest(ref.split('/')[-1], list(files))} "
            "(or give a path to a config.json or a model directory)"
        )
    return name, _cached_json(files[name]), str(files[name])


def load_model(ref: str) -> ModelShape:
    name, cfg, source = load_model_config(ref)
    if _config_path(ref) is not None:  # a user's file: read as it is now
        return model_shape_from_config(cfg, name, source)
    return _shape(name, source)


@lru_cache(maxsize=None)
def _shape(name: str, source: str) -> ModelShape:
    """A profile's shape, read once per process (the ladder resolves the same model many times)."""
    return model_shape_from_config(_cached_json(Path(source)), name, source)


# ---------------------------------------------------------------- Eagle3 drafts




DEFAULT_DRAFT_VOCAB = 32000


def draft_names() -> list[str]:
    return sorted(_json_files("drafts"))


def derive_draft(target: ModelShape, aux_layers: tuple[int, ...] | None = None) -> DraftShape:
    """`--draft auto`: the profile whose target is this model, else the target's own shape."""
    for name, path in _json_files("drafts").items():
        if _draft_matches(_cached_json(path), target):
            return draft_from_config(_cached_json(path), name, str(path), target, aux_layers)
    # No researched draft: mirror the target's attention and (dense) MLP width, as SpecForge does.
    width = target.intermediate if not target.is_moe else max(target.intermediate, 4 * target.hidden)
    return DraftShape(
        name=f"{target.name}-eagle3-auto",
        hidden=target.hidden,
        intermediate=width,
        heads=target.heads,
        kv_heads=target.kv_heads,
        head_dim=target.head_dim,
        vocab=target.vocab,
        draft_vocab=min(DEFAULT_DRAFT_VOCAB, target.vocab),
        target_hidden=target.hidden,
        aux_layers=tuple(aux_layers or target.default_aux_layers()),
    )


def _repo_keys(text: str) -> set[str]:
    """Repo names in free text, lower case, without an -Instruct suffix (same shapes)."""
    return {re.sub(r"-instruct$", "", t.split("/")[-1].lower()) for t in re.findall(r"[\w.-]+/[\w.-]+", text)}


def _draft_matches(profile: dict, target: ModelShape) -> bool:
    cfg = profile.get("config", {})
    target_repos = _repo_keys(str(target.raw.get("hf_repo", ""))) | {target.name.lower()}
    named = bool(_repo_keys(str(profile.get("target_model", ""))) & target_repos)
    return named and cfg.get("hidden_size") == target.hidden and cfg.get("vocab_size") == target.vocab


def draft_from_config(
    profile: dict, name: str, source: str, target: ModelShape, aux_layers: tuple[int, ...] | None = None
) -> DraftShape:
    cfg = profile.get("config", profile)
    for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if _int(cfg, key) is None:
            raise FitplanError(f"{source}: draft config is missing {key}")
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    eagle = cfg.get("eagle_config") or {}
    layers = aux_layers or eagle.get("eagle_aux_hidden_state_layer_ids") or target.default_aux_layers()
    return DraftShape(
        name=name,
        hidden=hidden,
        intermediate=_int(cfg, "intermediate_size"),
        heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", default=hidden // heads),
        vocab=_int(cfg, "vocab_size", default=target.vocab),
        draft_vocab=_int(cfg, "draft_vocab_size", default=DEFAULT_DRAFT_VOCAB),
        target_hidden=_int(cfg, "target_hidden_size", default=target.hidden),
        aux_layers=tuple(int(x) for x in layers),
    )


def load_draft(ref: str, target: ModelShape, aux_layers: tuple[int, ...] | None = None) -> DraftShape:
    if ref == "auto":
        return derive_draft(target, aux_layers)
    path = _config_path(ref)
    if path is not None:
        return draft_from_config(_read_json(path), path.stem, str(path), target, aux_layers)
    files = _json_files("drafts")
    if ref not in files:
        raise FitplanError(f"unknown draft {ref!r}: {_suggest(ref, list(files))} (or 'auto', or a path)")
    return draft_from_config(_cached_json(files[ref]), ref, str(files[ref]), target, aux_layers)


# ---------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuSpec:
    id: str
    total_bytes: int  # what torch reports as total capacity (below the nominal size)
    bf16_tflops: float  # dense tensor-core peak
    memory_tbps: float
    interconnect_gbps: float  # NVLink-class, per GPU, one direction
    pcie_gbps: float  # host link, one direction
    aliases: tuple[str, ...] = ()

    @property
    def peer_gbps(self) -> float:
        """GPU-to-GPU bandwidth, one direction: NVLink-class, or PCIe on GPUs without it."""
        return self.interconnect_gbps or self.pcie_gbps


@dataclass(frozen=True)
class Cluster:
    gpu: GpuSpec
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def label(self) -> str:
        prefix = f"{self.nodes}x" if self.nodes > 1 else ""
        return f"{prefix}{self.gpus_per_node}x{self.gpu.id}"




def _gpu_from_profile(entry: dict) -> GpuSpec:
    mem = entry.get("torch_total_memory") or {}
    total = mem.get("bytes") or int(round(float(mem["GiB"]) * GIB))
    link = entry.get("interconnect") or {}
    bidir = link.get("nvlink_GBps_bidirectional_per_gpu") or link.get("if_GBps_bidirectional_per_gpu") or 0
    pcie = str(entry.get("pcie", ""))
    pcie_bidir = float(m.group(1)) if (m := re.search(r"(\d+)\s*GB/s", pcie)) else 64.0
    return GpuSpec(
        id=entry["id"],
        total_bytes=int(total),
        bf16_tflops=float(entry["bf16_dense_tflops"]),
        memory_tbps=float(entry["memory_bandwidth_TBps"]),
        interconnect_gbps=float(bidir) / 2,
        pcie_gbps=pcie_bidir / 2,
        aliases=tuple(entry.get("aliases", ())),
    )


@lru_cache(maxsize=None)
def _gpu_table() -> tuple[GpuSpec, ...]:
    gpus: dict[str, GpuSpec] = {}
    for d in reversed(_profile_dirs()):
        p = d / "gpus.json"
        if p.is_file():
            for entry in _read_json(p).get("gpus", []):
                spec = _gpu_from_profile(entry)
                gpus[spec.id] = spec
    return tuple(gpus.values())


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def gpu_names() -> list[str]:
    return [g.id for g in _gpu_table()]


@lru_cache(maxsize=256)
def load_gpu(name: str) -> GpuSpec:
    wanted = _norm(name)
    for g in _gpu_table():
        if wanted in {_norm(g.id), *(_norm(a) for a in g.aliases)}:
            return g
    accepted = [g.id for g in _gpu_table()] + [a for g in _gpu_table() for a in g.aliases]
    raise FitplanError(f"unknown GPU {name!r}: {_suggest(name, accepted)}")


_GPUS_RE = re.compile(r"^\s*(?:(\d+)\s*[xX×]\s*)?(?:(\d+)\s*[xX×]\s*)?(.+?)\s*$")


def parse_gpus(text: str) -> Cluster:
    """'8xH100', '1xH200', '4xA100-80GB', '2x8xH100' (nodes x GPUs per node x type), 'H100'."""
    m = _GPUS_RE.match(text or "")
    if not m or not m.group(3):
        raise FitplanError(f"cannot read GPUs {text!r}: expected COUNTxTYPE such as 8xH100 or 2x8xH100")
    first, second, kind = m.groups()
    if second is not None:
        nodes, per_node = int(first), int(second)
    else:
        nodes, per_node = 1, int(first) if first is not None else 1
    if nodes < 1 or per_node < 1:
        raise FitplanError(f"GPU count in {text!r} must be at least 1")
    try:
        gpu = load_gpu(kind)
    except FitplanError as exc:
        raise FitplanError(f"in --gpus {text!r}: {exc}") from None
    return Cluster(gpu=gpu, nodes=nodes, gpus_per_node=per_node)
