"""Profiles: model shapes, Eagle3 draft shapes and GPU specs, from JSON.

The researched profiles ship inside the package (``fitplan.profiles_data``, the repository's
``profiles/`` folder). A user can point ``--model`` / ``--draft`` at any HF-style config.json
(or a directory holding one), and add GPUs or models in ``$FITPLAN_PROFILES`` (a folder laid
out like ``profiles/``). Unknown JSON fields are ignored; missing required ones are named.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fitplan.config import show as _show
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


@lru_cache(maxsize=None)
def _packaged_profiles() -> Path:
    """Installed: the wheel's fitplan.profiles_data. Run from a source tree: ../profiles.

    The package's folder is where its import spec puts its __init__.py (what
    importlib.resources.files answers for a package on disk, without importing the resource
    readers, a few ms of every `fitplan estimate`); it cannot move while the process runs."""
    spec = importlib.util.find_spec("fitplan.profiles_data")
    if spec is None or spec.origin is None:
        return Path(__file__).resolve().parent.parent / "profiles"
    return Path(spec.origin).parent


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


# The largest size a config field may hold. Real models stay far below (hidden 16384, vocab 262144,
# 126 layers, positions 10M); the bound keeps a typo such as 1e12 layers from making the estimator's
# arithmetic huge, while leaving room for any model that could exist.
MAX_DIM = 1 << 31


def _int(d: dict, *keys: str, default: int | None = None, source: str = "config", minimum: int = 1) -> int | None:
    """The first of `keys` that is set (not missing, not null), as an integer in [minimum, MAX_DIM].

    A field set to anything else (a float such as 64.5 or 1e400, a bool, a string, a negative size)
    is an error naming the field: a guess would estimate some other model.
    """
    for k in keys:
        v = d.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_DIM:
            sign = "must be positive: an integer" if minimum == 1 else "must be an integer"
            raise FitplanError(f"{source}: {k} {sign} from {minimum} to {MAX_DIM}, got {_show(v)}")
        return v
    return default


def _first_set(d: dict, *keys: str):
    return next((d[k] for k in keys if d.get(k) is not None), None)


def model_shape_from_config(cfg: dict[str, Any], name: str, source: str) -> ModelShape:
    """Read an HF config.json (or a profile with the same keys) into a ModelShape.

    Every size must be a positive integer (at most MAX_DIM), and the attention heads must fit
    together (KV heads dividing the heads, heads dividing hidden when head_dim is not given):
    anything else is a FitplanError naming the field.
    """
    if not isinstance(cfg, dict):
        raise FitplanError(f"{source}: expected a JSON object of config fields, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma 3): the LM part
        outer = {k: v for k, v in cfg.items() if k in REQUIRED_MODEL_KEYS and v is not None}
        cfg = {**cfg["text_config"], **outer}

    def num(*keys: str, default: int | None = None, minimum: int = 1) -> int | None:
        return _int(cfg, *keys, default=default, source=source, minimum=minimum)

    missing = [k for k in REQUIRED_MODEL_KEYS if num(k) is None]
    if missing:
        raise FitplanError(f"{source}: missing required field(s) {', '.join(missing)}")
    hidden, heads = num("hidden_size"), num("num_attention_heads")
    kv_heads = num("num_key_value_heads", default=heads)
    if kv_heads > heads or heads % kv_heads:
        raise FitplanError(
            f"{source}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads} "
            "(each KV head serves a whole group of query heads)"
        )
    head_dim = num("head_dim", "head_dim_effective")
    if head_dim is None:
        if hidden % heads:
            raise FitplanError(
                f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                "give head_dim when the heads do not split hidden evenly"
            )
        head_dim = hidden // heads
    values = dict(
        hidden=hidden,
        layers=num("num_hidden_layers"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=num("vocab_size"),
        # without intermediate_size, the usual 4h, within the same bound as a given size
        intermediate=num("intermediate_size", default=min(4 * hidden, MAX_DIM)),
        max_positions=num("max_position_embeddings"),
    )
    # Counts where 0 means "none" (a dense model has 0 experts).
    experts = num("num_local_experts", "n_routed_experts", "num_experts", default=0, minimum=0)
    per_token = num("num_experts_per_tok", "experts_per_token", default=0, minimum=0)
    if experts and per_token > experts:
        raise FitplanError(f"{source}: num_experts_per_tok {per_token} exceeds the {experts} experts")
    dense_layers = num("first_k_dense_replace", default=0, minimum=0)
    if dense_layers > values["layers"]:
        raise FitplanError(
            f"{source}: first_k_dense_replace {dense_layers} exceeds num_hidden_layers {values['layers']}"
        )
    model_type = cfg.get("model_type", "unknown")
    if not isinstance(model_type, str):
        raise FitplanError(f"{source}: model_type must be a string, got {_show(model_type)}")
    quant = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else {}
    mla = cfg.get("mla") if isinstance(cfg.get("mla"), dict) else None
    return ModelShape(
        name=name,
        model_type=model_type,
        # Research profiles record HF's default (tied for Gemma) as tie_word_embeddings_effective.
        tie_embeddings=bool(_first_set(cfg, "tie_word_embeddings", "tie_word_embeddings_effective")),
        attention_bias=bool(cfg.get("attention_bias", False)),
        experts=experts,
        experts_per_token=per_token,
        expert_intermediate=(num("moe_intermediate_size") or values["intermediate"] if experts else 0),
        shared_experts=num("n_shared_experts", default=0, minimum=0),
        dense_layers=dense_layers,
        packed_format=quant.get("quant_method") if quant.get("quant_method") == "mxfp4" else None,
        final_logit_softcap=cfg.get("final_logit_softcapping") is not None,
        mla_attention_params=_mla_params(cfg, hidden, heads, source) if mla or cfg.get("kv_lora_rank") else None,
        raw=cfg,
        **values,
    )


def _mla_params(cfg: dict, hidden: int, heads: int, source: str = "config") -> int:
    """DeepSeek multi-head latent attention: parameters of one layer's attention block."""
    src = {**cfg, **(cfg.get("mla") if isinstance(cfg.get("mla"), dict) else {})}

    def num(key: str, default: int) -> int:
        return _int(src, key, default=default, source=source)

    q_rank = num("q_lora_rank", 1536)
    kv_rank = num("kv_lora_rank", 512)
    nope = num("qk_nope_head_dim", 128)
    rope = num("qk_rope_head_dim", 64)
    v_dim = num("v_head_dim", 128)
    q = hidden * q_rank + q_rank + q_rank * heads * (nope + rope)
    kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
    return q + kv + heads * v_dim * hidden


def model_names() -> list[str]:
    return sorted(_json_files("models"))


# Checkpoint variants with the base model's shapes: chat/instruction tuning, pre-trained, base.
_VARIANT = re.compile(r"-(instruct|it|pt|base|chat|thinking)(?=-|$)")


def same_shape_key(ref: str) -> str:
    """A model's name without its org or variant: 'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'.

    Older Meta repos spell the name 'Meta-Llama-3.1-8B-Instruct'.
    """
    name = ref.rstrip("/").split("/")[-1].lower()
    name = _VARIANT.sub("", re.sub(r"^meta-(?=llama)", "", name))
    return re.sub(r"-\d{4}$", "", name)  # a dated release (Qwen3-235B-A22B-Instruct-2507): same shapes


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
    """The config.json `ref` names when it is a path (a file or a model directory), else None."""
    try:
        return _existing_config(ref)
    except RuntimeError:  # Path.expanduser: '~nouser/...' names no user
        raise FitplanError(f"{ref}: {ref.split('/')[0]!r} is not a user's home folder; give the path in full") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a folder it may not read
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FitplanError(f"{_show(ref)}: cannot be read as a path ({reason}); give a profile name, "
                           "a repo id, a config.json or a model directory") from None


def _existing_config(ref: str) -> Path | None:
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
    if not isinstance(cfg, dict):
        raise FitplanError(f"{source}: draft config must be a JSON object, got {type(cfg).__name__}")

    def num(key: str, default: int | None = None) -> int | None:
        return _int(cfg, key, default=default, source=source)

    for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if num(key) is None:
            raise FitplanError(f"{source}: draft config is missing {key}")
    hidden = num("hidden_size")
    heads = num("num_attention_heads")
    kv_heads = num("num_key_value_heads", default=heads)
    if kv_heads > heads or heads % kv_heads:
        raise FitplanError(f"{source}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
    head_dim = num("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise FitplanError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                               "give head_dim")
        head_dim = hidden // heads
    eagle = cfg.get("eagle_config") if isinstance(cfg.get("eagle_config"), dict) else {}
    layers = aux_layers or eagle.get("eagle_aux_hidden_state_layer_ids") or target.default_aux_layers()
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_DIM for x in layers
    ):
        raise FitplanError(f"{source}: eagle_aux_hidden_state_layer_ids must be a list of layer indices, "
                           f"got {_show(layers)}")
    return DraftShape(
        name=name,
        hidden=hidden,
        intermediate=num("intermediate_size"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=num("vocab_size", default=target.vocab),
        draft_vocab=num("draft_vocab_size", default=DEFAULT_DRAFT_VOCAB),
        target_hidden=num("target_hidden_size", default=target.hidden),
        aux_layers=tuple(layers),
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
    compute_capability: tuple[int, int] | None = None  # NVIDIA's (major, minor); None elsewhere

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
        compute_capability=_capability(entry.get("compute_capability")),
    )


def _capability(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


@lru_cache(maxsize=None)
def _gpu_table() -> tuple[GpuSpec, ...]:
    gpus: dict[str, GpuSpec] = {}
    for d in reversed(_profile_dirs()):
        p = d / "gpus.json"
        if p.is_file():
            entries = _read_json(p).get("gpus", [])
            for number, entry in enumerate(entries if isinstance(entries, list) else [entries], 1):
                try:
                    spec = _gpu_from_profile(entry)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    what = _show(exc.args[0] if exc.args else "")
                    raise FitplanError(
                        f"{p}: GPU entry {number} is incomplete ({type(exc).__name__}: {what}); each needs id, "
                        "torch_total_memory (bytes or GiB), bf16_dense_tflops and memory_bandwidth_TBps"
                    ) from None
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


# Bounds on the counts of --gpus. One node's GPUs share a fast domain; the largest sold today is
# 72 (GB200 NVL72) and announced ones reach 576, so 1024 leaves room while keeping the TP search
# (the divisors of the per-node count) instant. 100000 nodes is beyond any cluster built, and keeps
# the world size and the batch arithmetic small.
MAX_GPUS_PER_NODE = 1024
MAX_NODES = 100_000
MAX_GPUS_TEXT = 200  # characters: '2x8xNVIDIA H100 80GB HBM3' is 25
_X = r"\s*[xX×]\s*"
_GPUS_RE = re.compile(rf"^\s*(?:([+-]?\d+){_X})?(?:([+-]?\d+){_X})?(.*?)\s*$", re.ASCII | re.DOTALL)
_GPUS_FORM = "expected COUNTxTYPE such as 8xH100, or NODESxCOUNTxTYPE such as 2x8xH100"


def _count(digits: str, what: str, maximum: int, text: str, hint: str = "") -> int:
    """A count of --gpus, in [1, maximum]; huge digit strings are refused before int() reads them."""
    value = int(digits) if len(digits.lstrip("+-").lstrip("0")) <= 9 else maximum + 1
    if not 1 <= value <= maximum:
        shown = digits if len(digits) <= 24 else digits[:20] + "..."
        raise FitplanError(
            f"--gpus {_show(text)}: {what} {shown} is out of range: accepted at least 1, at most {maximum}{hint}"
        )
    return value


def parse_gpus(text: str) -> Cluster:
    """'8xH100', '1xH200', '4xA100-80GB', '2x8xH100' (nodes x GPUs per node x type), 'H100'."""
    if not isinstance(text, str) or not text.strip():
        raise FitplanError(f"no GPUs given; {_GPUS_FORM}")
    if len(text) > MAX_GPUS_TEXT:
        raise FitplanError(f"--gpus is {len(text)} characters long (at most {MAX_GPUS_TEXT}); {_GPUS_FORM}")
    first, second, kind = _GPUS_RE.match(text).groups()  # every string matches (all parts optional)
    if not kind or re.fullmatch(r"[+-]?\d+", kind, re.ASCII):
        raise FitplanError(f"cannot read GPUs {text!r}: no GPU type; {_GPUS_FORM}")
    if re.match(r"[+-]?\d+" + _X, kind, re.ASCII):
        raise FitplanError(f"cannot read GPUs {text!r}: more than two counts; {_GPUS_FORM}")
    if re.match(_X, kind) and first is None:
        raise FitplanError(f"cannot read GPUs {text!r}: no count before 'x'; {_GPUS_FORM}")
    if second is not None:
        nodes = _count(first, "node count", MAX_NODES, text)
        per_node = _count(second, "GPUs per node", MAX_GPUS_PER_NODE, text)
    else:
        nodes = 1
        per_node = 1 if first is None else _count(
            first, "GPU count", MAX_GPUS_PER_NODE, text, " per node (NODESxCOUNTxTYPE for several nodes, e.g. 2x8xH100)"
        )
    try:
        gpu = load_gpu(kind)
    except FitplanError as exc:
        if re.search(_X + r"[+-]?\d+$", kind, re.ASCII):
            raise FitplanError(f"cannot read GPUs {text!r}: counts go before the GPU type; {_GPUS_FORM}") from None
        raise FitplanError(f"in --gpus {text!r}: {exc}") from None
    return Cluster(gpu=gpu, nodes=nodes, gpus_per_node=per_node)
