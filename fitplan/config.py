"""RunSpec: the user's training job as typed, validated data.

One field per knob. The YAML key of a field is its name (``micro_batch: 2``); the CLI flag is
the same name with dashes (``--micro-batch 2``); flags override the file. Values are
validated here for what can be checked without profiles (choices, positive sizes,
contradictions); checks that need the model or the GPUs (heads divisible by tp, ...) happen
where the spec is resolved against the profiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from fitplan.errors import FitplanError

Workload = Literal["eagle3", "sft"]
Sharding = Literal["none", "zero1", "zero2", "zero3"]
OutputSharding = Literal["gather", "all-to-all"]
Precision = Literal["mixed", "fp32-autocast", "bf16-master", "bf16"]
Optimizer = Literal["adamw", "adamw-8bit", "muon"]
Attention = Literal["flex", "split", "sdpa", "eager"]
TargetWeights = Literal["bf16", "mxfp4"]
Offload = Literal["none", "optimizer", "params"]
Runtime = Literal["fitplan", "specforge", "speculators"]
TargetBackend = Literal["sglang", "hf"]
DraftMemory = Literal["lean", "plain"]

# From this length on the split TTT attention beats flex on an H200 (forward + backward of a 7-step
# unroll: 14.1 against 16.6 ms at 4096, 9.1 against 7.3 at 2048; docs/data/ttt_attention_kernels_*.json),
# with its causal part on cuDNN's kernel, which the trainer uses from compute capability 9.0 on. On
# FlashAttention-2, its kernel before that, it was slower than flex at every length (19.5 ms at
# 4096): the default there stays flex. Measured on Hopper only, so the default is split there only.
SPLIT_ATTENTION_FROM_SEQ = 4096
CUDNN_ATTENTION_FROM_CAPABILITY = (9, 0)
SPLIT_ATTENTION_DEFAULT_MAJOR = 9  # Hopper

POSITIVE_INTS = ("seq", "micro_batch", "global_batch", "accum", "tp", "ttt")
# Beyond any real job, and far below what makes arithmetic on sizes slow or overflow floats.
MAX_INT = 1 << 40
# The estimator sums the draft's saved tensors step by step: an unroll of 1e8 takes minutes.
# Eagle3 trains with 7; 1024 is far past any draft and sums in microseconds.
MAX_TTT = 1024
# A config is about 1 KiB and a plan (fitplan fit -o) about 4 KiB. PyYAML reads roughly 50 KiB/s of
# the worst text in pure Python (5 MB/s with libyaml): the cap keeps reading a file under a second.
MAX_YAML_BYTES = 64 * 1024
# Values a config may hold once YAML aliases are expanded: a config has about 25 and a plan a few
# hundred. An alias bomb (a: &a [x, x], b: &b [*a, *a], ...) loads instantly as shared lists but
# expands to billions of values for anything that walks it (a repr in an error message).
MAX_YAML_VALUES = 10_000


@lru_cache(maxsize=64)
def _on_hopper(gpus: str) -> bool:
    """Whether the job's GPUs are Hopper (where the split attention was measured faster); False
    for GPUs that cannot be read, which the job's rules refuse anyway."""
    from fitplan.profiles import parse_gpus  # fitplan.profiles reads this module

    try:
        capability = parse_gpus(gpus).gpu.compute_capability
    except FitplanError:
        return False
    return capability is not None and capability[0] == SPLIT_ATTENTION_DEFAULT_MAJOR


@dataclass(frozen=True)
class RunSpec:
    """A training job as the user describes it (before profiles are resolved)."""

    model: str
    """Target model: profile name, HF repo id, config.json or model directory."""
    draft: str = "auto"
    """Eagle3 draft: 'auto', a draft profile name, or a config path. Runtime speculators: 'auto' or
    'speculators' (the draft speculators builds from the verifier, full vocabulary) or
    'speculators:N' (its vocabulary pruned to N tokens, --draft-vocab-size N)."""
    gpus: str = "1xH100"
    """COUNTxTYPE (8xH100) or NODESxCOUNTxTYPE (2x8xH100)."""
    workload: Workload = "eagle3"
    seq: int = 4096
    micro_batch: int = 1
    global_batch: Optional[int] = None
    """None: micro_batch x data-parallel ranks x accum."""
    accum: Optional[int] = None
    """None: derived from global_batch, else 1."""
    tp: Optional[int] = None
    """None: chosen when the spec is resolved (fitplan.layout)."""
    sharding: Sharding = "zero2"
    output_sharding: OutputSharding = "gather"
    precision: Precision = "bf16-master"
    optimizer: Optimizer = "adamw"
    """adamw, adamw-8bit (torchao's 8-bit moments), or muon (speculators' default: torch's Muon
    for the 2-D weights, AdamW for the rest; runtime speculators only)."""
    ac: bool = False
    attention: Optional[Attention] = None
    """The draft's TTT attention (eagle3) or the model's (sft). flex: one compiled kernel over the
    concatenated keys of steps 0..k under the TTT block mask. split (fitplan's trainer, eagle3):
    step 0's keys on a plain causal kernel (cuDNN from Hopper on, FlashAttention-2 before) with
    each later step's key folded in at its own position, no concatenation (trainer/ttt_attention.py):
    on Hopper faster than flex from S 4096 on, slower below. sdpa and eager: torch's, given the
    dense mask (references). None: split for fitplan's eagle3 trainer on Hopper GPUs from seq
    4096 on (SPLIT_ATTENTION_FROM_SEQ), else flex for eagle3 and sdpa for sft."""
    ttt: int = 7
    target_weights: TargetWeights = "bf16"
    offload: Offload = "none"
    expandable_segments: bool = False
    aux_layers: Optional[tuple[int, ...]] = None
    """None: the draft's, else [1, n/2-1, n-4]."""
    runtime: Runtime = "fitplan"
    """fitplan: the embedded trainer. specforge: SpecForge's classic train_eagle3.py. speculators:
    vLLM speculators' scripts/train.py (Eagle3; hidden states from files or a vLLM server)."""
    target_backend: TargetBackend = "sglang"
    """specforge runtime only."""
    sglang_mem_fraction: Optional[float] = None
    """specforge runtime only: SGLang's mem_fraction_static, its share of each trainer GPU."""
    vllm_gpu_memory_utilization: Optional[float] = None
    """speculators runtime only: the gpu_memory_utilization of a vLLM server that shares the
    trainer's GPUs (None: the server, if any, runs on GPUs of its own)."""
    offline: bool = False
    """The target's features (aux and last hidden states) are read from disk and no target runs:
    SpecForge's offline mode, or fitplan's trainer given `fitplan train --hidden-states DIR`."""
    draft_memory: Optional[DraftMemory] = None
    """fitplan runtime, eagle3. lean: the draft's lm_head is fused with the loss and its SwiGLU
    recomputed in backward, so no step keeps its logits; plain: torch's own composition, as
    SpecForge's draft (and fitplan's trainer before the lean draft: what older reports ran).
    None: lean wherever fitplan's trainer runs an eagle3 draft; given elsewhere (sft, another
    runtime) it is refused (fitplan.layout)."""
    recompute_norms: Optional[bool] = None
    """fitplan runtime, eagle3 lean draft: each RMSNorm's output (and o_proj's [B, S, H*d] input)
    is made again in backward instead of kept, the final norm inside the fused head, and the
    teacher is held as the target's bf16 logits over the draft vocab (softmax per chunk) instead
    of fp32 probabilities. None: on wherever the draft is lean; true elsewhere is refused
    (fitplan.layout). false: kept, and an fp32 teacher, as the first lean draft (its reports)."""
    sum_step_grads: Optional[bool] = None
    """fitplan runtime, eagle3 lean draft with fused norms: each draft weight's gradient is summed
    over the TTT steps' backward in one buffer and handed to autograd once, instead of a gradient
    per step added into autograd's own sum (one [out, in] gradient fewer alive at each step's
    backward). Not with `mixed`, whose fp32 gradients already take each step's. None: on wherever
    it applies; true elsewhere is refused (fitplan.layout). false: per step, as before (its reports)."""
    recompute_mlp: bool = False
    """fitplan runtime, lean draft with fused norms: the MLP keeps only its input (the hidden
    after attention, which the layer keeps anyway) and makes gate and up again in backward, two
    more [B, S, h] x [h, I] matmuls per TTT step (some 5% of a step), instead of keeping gate and
    up, 4I bytes per token per step. false: kept (the faster default)."""
    head_grad_in_forward: Optional[bool] = None
    """fitplan runtime, lean draft with summed step gradients (sum_step_grads, not mixed): the
    fused head makes its gradients in forward while each chunk's logits exist, instead of forming
    the logits again in backward: one [B, S, h] x [h, Vd] matmul and one softmax pass fewer per TTT
    step; a step keeps its hidden's gradient (2h bytes per token) and the teacher is let go before
    backward. None: on where it applies. false: made again in backward, as before (its reports)."""
    project_embedding_once: Optional[bool] = None
    """fitplan runtime, lean draft with summed step gradients (sum_step_grads), 2 or more TTT
    steps: the embedding's half of the q/k/v projection is made once per unroll over its S + L - 1
    tokens (step k reads rows k..k+S) instead of per step, and its gradients once from their sum;
    no step keeps its embedding (2h bytes per token per step), the unroll keeps that projection
    and its fp32 gradient instead. None: on where it applies; true elsewhere is refused
    (fitplan.layout). false: per step, as before (its reports)."""
    optimizer_per_param: Optional[bool] = None
    """fitplan runtime, bf16-master recipe: the optimizer steps one parameter at a time, each
    bf16 gradient freed as its fp32 copy is made, so one fp32 gradient copy is alive at the
    step's peak instead of all of them beside all the bf16 gradients; each tensor costs one more
    optimizer call. None: on for eagle3 (the draft's dozen tensors: no time), off for sft (an
    sft model's hundreds: some 5-18 ms a step; `fit` turns it on when memory is short); true
    where no copy of every gradient is made is refused (fitplan.layout). false: every copy at
    once, as before (its reports)."""
    split_master: Optional[bool] = None
    """fitplan runtime, bf16-master recipe, AdamW on the GPU: each fp32 master is held split, its
    high half rounded into the bf16 parameter and its low 16 bits beside it (2 B/param instead
    of 4), and one fused kernel per tensor steps it from the bf16 gradient (no fp32 gradient
    copy). The master's arithmetic is AdamW's in fp32 as before. None: on where it applies;
    true elsewhere is refused (fitplan.layout). false: fp32 masters and gradient copies, as
    before (its reports)."""
    share_embedding: bool = True
    """fitplan runtime, eagle3 with a live target whose embedding is whole on each rank (tp 1):
    the draft's frozen embedding is the target's own tensor, not a copy of it, so one [V, h] is
    held instead of two. false: a copy, as the trainer made before (its reports)."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def attention_impl(self) -> str:
        if self.attention:
            return self.attention
        if self.workload != "eagle3":
            return "sdpa"
        fast_split = self.runtime == "fitplan" and self.seq >= SPLIT_ATTENTION_FROM_SEQ and _on_hopper(self.gpus)
        return "split" if fast_split else "flex"

    def replace(self, **changes: Any) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML key names (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["aux_layers"] is not None:
            out["aux_layers"] = list(out["aux_layers"])
        return out


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunSpec))
_HINTS = get_type_hints(RunSpec)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = get_args(hint)
    if get_origin(hint) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


_FIELD_TYPES = {name: _unwrap_optional(_HINTS[name]) for name in FIELD_NAMES}


def field_type(name: str) -> tuple[Any, bool]:
    """(the field's type without Optional, whether None is allowed)."""
    return _FIELD_TYPES[name]


CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(field_type(name)[0]) for name in FIELD_NAMES if get_origin(field_type(name)[0]) is Literal
}


def validate(spec: RunSpec) -> None:
    if not isinstance(spec.model, str) or not spec.model.strip():
        given = "" if spec.model is None or spec.model == "" else f", got {show(spec.model)}"
        raise FitplanError(f"model is required: a profile name, a repo id, or a path to a config.json{given}")
    for name in FIELD_NAMES:
        _check_type(name, getattr(spec, name))
    _check_engine_shares(spec)
    if spec.global_batch is not None and spec.global_batch % spec.micro_batch:
        raise FitplanError(
            f"global_batch {spec.global_batch} is not a multiple of micro_batch {spec.micro_batch}"
        )
    if spec.offload == "params" and spec.sharding != "zero3":
        raise FitplanError("offload params needs sharding zero3 (parameters are offloaded per shard)")
    if spec.workload == "sft" and spec.output_sharding == "all-to-all":
        raise FitplanError("output_sharding all-to-all applies to the eagle3 workload's TP target only")


def _check_engine_shares(spec: RunSpec) -> None:
    """An inference engine's share of each trainer GPU: in (0, 1), and only under the runtime whose
    engine it sizes (SpecForge's target runs in SGLang, speculators' hidden states come from vLLM).
    fitplan.layout refuses sglang_mem_fraction under runtime fitplan, with target_backend."""
    for name in ("sglang_mem_fraction", "vllm_gpu_memory_utilization"):
        value = getattr(spec, name)
        if value is not None and not 0 < value < 1:
            raise FitplanError(f"{name} must be in (0, 1), got {value}")
    if spec.vllm_gpu_memory_utilization is not None and spec.runtime != "speculators":
        raise FitplanError(f"vllm_gpu_memory_utilization is a vLLM server sharing the GPUs of speculators' trainer; "
                           f"runtime {spec.runtime} runs none (add --runtime speculators, or drop it)")
    if spec.sglang_mem_fraction is not None and spec.runtime == "speculators":
        raise FitplanError("sglang_mem_fraction is SGLang's mem_fraction_static (runtime specforge); speculators' "
                           "trainer runs no SGLang (a vLLM server sharing its GPUs: vllm_gpu_memory_utilization)")


def _check_type(name: str, value: Any) -> None:
    """Strict types: a boolean key takes a boolean, a choice one of its values, a size an integer."""
    kind, optional = field_type(name)
    if value is None:
        if optional:
            return
        raise FitplanError(f"{name} must be given a value, got null")
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise FitplanError(f"{name} {value!r} is not one of: {', '.join(CHOICES[name])}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise FitplanError(f"{name} must be true or false (a YAML boolean), got {value!r}")
    elif kind is int:
        top = MAX_TTT if name == "ttt" else MAX_INT
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise FitplanError(f"{name} must be a positive integer (at most {top}), got {show(value)}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise FitplanError(f"{name} must be a number, got {show(value)}")
    elif kind is str:
        if not isinstance(value, str) or not value.strip():
            raise FitplanError(f"{name} must be a non-empty string, got {show(value)}")
    elif name == "aux_layers":
        if not isinstance(value, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT for v in value
        ):
            raise FitplanError(f"aux_layers must be a list of layer indices (0 or more), got {show(value)}")


def _coerce(name: str, value: Any) -> Any:
    """The one conversion YAML and flags need: aux_layers as a list or '1,17,33'."""
    if name == "aux_layers" and value is not None:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise FitplanError(f"aux_layers must be a list of layer indices, got {show(value)}")
        try:
            return tuple(_layer_index(v) for v in value)
        except (TypeError, ValueError):
            raise FitplanError(f"aux_layers must be a list of layer indices, got {show(value)}") from None
    return value


def _layer_index(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(value)
    if isinstance(value, str) and len(value.strip()) > 12:  # int() of a huge digit string is slow or refused
        raise ValueError(value)
    return int(value)


def show(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, cut short (a value can be a 10 MB string or an alias bomb)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel = 2
    return r.repr(value)


def spec_from_mapping(values: Mapping[str, Any], source: str = "config") -> RunSpec:
    """Build a RunSpec from YAML-style keys; an unknown key is an error naming it."""
    if not isinstance(values, Mapping):
        raise FitplanError(f"{source}: expected a mapping of keys (model: ..., seq: ...), got {type(values).__name__}")
    unknown = sorted(show(k, 40)[1:-1] if isinstance(k, str) else show(k, 40) for k in values if k not in FIELD_NAMES)
    if unknown:
        named = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise FitplanError(f"{source}: unknown key(s) {named}; known keys: {', '.join(FIELD_NAMES)}")
    if "model" not in values or values["model"] is None or (isinstance(values["model"], str) and not values["model"]):
        where = "give --model" if source == "flags" else f"{source}: add 'model:'"
        raise FitplanError(f"the target model is required: {where} (a profile name from `fitplan profiles`, "
                           "an HF repo id, or a config.json)")
    try:
        kwargs = {k: _coerce(k, v) for k, v in values.items()}
    except FitplanError as exc:
        raise FitplanError(f"{source}: {exc}") from None
    try:
        return RunSpec(**kwargs)
    except FitplanError as exc:
        raise FitplanError(str(exc) if source == "flags" else f"{source}: {exc}") from None


def read_text(path: Path) -> str:
    """A text input file as UTF-8 (a BOM is dropped); anything else is a one-line error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FitplanError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        hint = " (it looks like UTF-16, e.g. PowerShell's '>')" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise FitplanError(f"{path}: not UTF-8 text{hint}; save it as UTF-8") from None


def yaml_or_error(text: str, source: Path | str) -> Any:
    """yaml.safe_load with every failure as a one-line error naming the source; bounded in time and
    size (MAX_YAML_BYTES of text, MAX_YAML_VALUES values once aliases are expanded)."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise FitplanError(f"{source}: {len(text)} characters is too long for a config "
                           f"(at most {MAX_YAML_BYTES // 1024} KiB); give the job's YAML config or plan")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: 100x faster
    try:
        data = yaml.load(text, Loader=loader)  # a safe loader: plain values only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FitplanError(f"{source}: not valid YAML{where}") from None
    except RecursionError:
        raise FitplanError(f"{source}: YAML nested too deeply to be a config") from None
    except (ValueError, OverflowError, TypeError):  # a timestamp or a number out of range (2024-99-99)
        raise FitplanError(f"{source}: a value YAML cannot read (an integer thousands of digits long, "
                           "or an impossible date such as 2024-99-99)") from None
    _expanded_size(data, source)
    return data


def _expanded_size(data: Any, source: Path | str) -> int:
    """How many values `data` holds with every alias expanded, each shared object counted once per
    use but walked once; more than MAX_YAML_VALUES (or a self-reference) is an error."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(obj: Any) -> int:
        if not isinstance(obj, (list, dict)):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in walking:
            raise FitplanError(f"{source}: a YAML alias refers to itself; a config holds plain values")
        walking.add(key)
        children = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise FitplanError(f"{source}: holds more than {MAX_YAML_VALUES} values once YAML aliases are "
                                   "expanded; a config holds a few dozen (is it an alias bomb?)")
        walking.discard(key)
        sizes[key] = total
        return total

    try:
        return size(data)
    except RecursionError:
        raise FitplanError(f"{source}: YAML nested too deeply to be a config") from None


def read_job_file(path: str | Path) -> str:
    """The text of a job file (a YAML config, a plan or a launch script): a missing, special, huge
    or non-UTF-8 file is a one-line error naming it."""
    p = Path(path)
    if p.is_dir():
        raise FitplanError(f"{p} is a directory; give a config file (YAML, a plan or a SpecForge launch script)")
    if not p.is_file():
        if p.exists():
            raise FitplanError(f"{p} is not a regular file; give a config file (YAML)")
        raise FitplanError(f"config file {str(p)!r} does not exist")
    try:
        too_big = p.stat().st_size > 4 * MAX_YAML_BYTES  # UTF-8: at most 4 bytes a character
    except OSError as exc:
        raise FitplanError(f"{p}: cannot be read ({exc.strerror})") from None
    if too_big:
        raise FitplanError(f"{p}: {p.stat().st_size} bytes is too large for a config "
                           f"(at most {MAX_YAML_BYTES // 1024} KiB); give the job's YAML config, plan or launch script")
    return read_text(p)


def yaml_mapping(text: str, source: str | Path) -> dict[str, Any]:
    data = yaml_or_error(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FitplanError(f"{source}: expected a mapping of keys (model: ..., seq: ...), got {type(data).__name__}")
    return data


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    return yaml_mapping(read_job_file(path), Path(path))


def is_launch_script(text: str) -> bool:
    """A SpecForge `train_eagle3.py` launch (a command line or a shell script), not YAML (a SpecForge
    v0.3 run config may mention train_eagle3 in a path or a comment: it is not a launch)."""
    if "train_eagle3" not in text:
        return False
    from fitplan.specforge_yaml import v03_mapping

    return v03_mapping(text) is None


def load_spec(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """File values, then overrides (CLI flags that were given; None means not given).

    A plan file (fitplan fit -o) holds the configuration under ``config:``, a SpecForge launch
    script its command line, and a SpecForge v0.3 run config (fitplan/specforge_yaml.py) its trainer
    job: all are read here too, so every command takes them alike.
    """
    if path is None:
        return spec_from_text(None, "flags", overrides)
    return spec_from_text(read_job_file(path), str(path), overrides)


def spec_from_text(text: str | None, source: str, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """A config, plan or launch script given as text (a file's, or a file's at a git revision)."""
    values: dict[str, Any] = {}
    if text is not None:
        from fitplan.speculators import from_config_text  # speculators' train.py launch or run.yaml

        run = from_config_text(text, source, overrides)
        if run is not None:
            return run.spec(overrides)
    if text is not None and is_launch_script(text):
        from fitplan.specforge import parse_command  # reads launches into this module's RunSpec

        return parse_command(text).spec(overrides)
    if text is not None:
        from fitplan.specforge_yaml import read_text  # SpecForge v0.3 YAML, before fitplan's own keys

        run = read_text(text, source, overrides)
        if run is not None:
            return run.spec
        values = yaml_mapping(text, source)
        if "fitplan_plan" in values:
            from fitplan.records import plan_from_mapping  # records build on this module

            values = plan_from_mapping(values, source).config.to_dict()
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return spec_from_mapping(values, source)
