"""Resolve a RunSpec against the profiles into a Job, checking the job's rules once.

Every command (estimate, fit, check, diff, explain, train) builds its Job here, so a layout
or knob one of them refuses, all of them refuse, with the same one-line message, before
anything is computed, loaded or launched. The rules that need the model, the draft or the
GPUs live here; fitplan.config checks what needs no profiles.

The rules of the `fitplan` runtime are what the embedded trainer runs (trainer/): a layout
this module accepts, `fitplan train` carries out; the fix ladder builds every candidate
through `resolve`, so `fitplan fit` never proposes a plan the trainer would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.profiles import Cluster, load_draft, load_model, parse_gpus
from fitplan.shapes import DraftShape, ModelShape, weight_bytes

# Model families whose decoder layers the trainer's tensor parallelism splits (q/k/v/o and a
# gate/up/down MLP or fused experts). DeepSeek's latent attention has other projections.
TRAINER_TP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "gemma3_text")
# Draft sharding the trainer does with FSDP2 when several ranks train the draft.
TRAINER_SHARDINGS = ("zero2", "zero3")
# Knob values the embedded trainer does not carry out, with why; it runs every other value
# (trainer/optim.py: adamw-8bit is torchao's AdamW8bit, offload optimizer is trainer/offload.py).
TRAINER_KNOBS = {
    ("offload", "params"): "fitplan's trainer does not run it yet: its FSDP2 sharding of the draft sets no "
                           "CPUOffloadPolicy (accepted: none, optimizer)",
    ("target_weights", "mxfp4"): "fitplan's trainer does not run it yet: transformers' MXFP4 path (Mxfp4HfQuantizer) "
                                 "fetches its Triton kernels from the Hugging Face hub as it loads "
                                 "(kernels-community/gpt-oss-triton-kernels, through the kernels package), which "
                                 "an offline GPU machine cannot, and without them it dequantizes the experts to bf16 "
                                 "(accepted: bf16)",
    ("optimizer", "muon"): "Muon is speculators' optimizer (--runtime speculators); fitplan's trainer runs "
                           "AdamW (accepted: adamw, adamw-8bit)",
}
# What SpecForge's classic train_eagle3.py runs whatever it is told: one FSDP SHARD_GRAD_OP unit
# and its BF16Optimizer (bf16 parameters, fp32 master and moments), no offload.
SPECFORGE_KNOBS = {"sharding": "zero2", "precision": "bf16-master", "optimizer": "adamw", "offload": "none"}
# What speculators' scripts/train.py runs whatever it is told (fitplan/estimator/speculators_runtime.py):
# knob -> (the value, why).
SPECULATORS_KNOBS = {
    "precision": ("fp32-autocast", "fp32 master weights under bf16 autocast"),
    "offload": ("none", "no CPU offload"),
    "ac": (False, "no activation checkpointing"),
    "micro_batch": (1, "one packed sequence of --total-seq-len tokens (seq) a step"),
    "offline": (True, "its hidden states are read, from files or a vLLM server; no verifier runs in it"),
}
# DDP (sharding none) by default, FSDP2 fully_shard under --fsdp-shard (sharding zero3).
SPECULATORS_SHARDINGS = ("none", "zero3")
SPECULATORS_OPTIMIZERS = ("muon", "adamw")
# The Eagle3 draft's fc layer reads three target layers concatenated (3h -> h).
AUX_LAYER_COUNT = 3


@dataclass(frozen=True)
class Job:
    spec: RunSpec
    model: ModelShape
    draft: DraftShape | None  # None for the sft workload
    cluster: Cluster
    tp: int  # target tensor-parallel size (1 for sft)
    accum: int  # gradient-accumulation micro-steps per optimizer step
    warnings: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def dp(self) -> int:
        """Data-parallel ranks of the trained model: every rank trains the draft (eagle3)."""
        return self.world

    @property
    def global_batch(self) -> int:
        return self.spec.micro_batch * self.dp * self.accum

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.spec.seq


# ---------------------------------------------------------------- tensor parallelism


def tp_problem(model: ModelShape, gpus_per_node: int, tp: int, runtime: str) -> str | None:
    """Why `tp` cannot split this model's target in this runtime, or None when it can."""
    if gpus_per_node % tp:
        return f"does not divide the {gpus_per_node} GPUs per node"
    if model.heads % tp:
        return f"does not divide the {model.heads} attention heads of {model.name}"
    if runtime == "specforge":  # SGLang replicates KV heads when tp exceeds them
        if model.kv_heads % tp and tp % model.kv_heads:
            return f"neither divides nor is a multiple of the {model.kv_heads} KV heads of {model.name}"
        return None
    if tp == 1:
        return None
    if model.kv_heads % tp:
        return (f"does not divide the {model.kv_heads} KV heads of {model.name} "
                "(fitplan's trainer gives each rank whole KV heads; it does not replicate them)")
    if model.model_type not in TRAINER_TP_FAMILIES:
        return f"splits no {model.model_type} target: fitplan's trainer splits {', '.join(TRAINER_TP_FAMILIES)}"
    widths = {"vocabulary": model.vocab, "intermediate size": model.expert_intermediate if model.is_moe else model.intermediate}
    if model.is_moe and model.dense_layers:
        widths["dense intermediate size"] = model.intermediate
    for what, size in widths.items():
        if size % tp:
            return f"does not divide the {what} {size} of {model.name}"
    return None


def tp_options(model: ModelShape, gpus_per_node: int, runtime: str) -> list[int]:
    """The TP sizes that can split this model on one node, smallest first."""
    return [t for t in _divisors(gpus_per_node) if tp_problem(model, gpus_per_node, t, runtime) is None]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_tp(model: ModelShape, cluster: Cluster, tp: int, runtime: str) -> None:
    problem = tp_problem(model, cluster.gpus_per_node, tp, runtime)
    if problem:
        accepted = ", ".join(map(str, tp_options(model, cluster.gpus_per_node, runtime)))
        raise FitplanError(f"tp {tp} {problem}; accepted: {accepted}")


def auto_tp(model: ModelShape, cluster: Cluster, weight_bytes_total: int, runtime: str) -> int:
    """Smallest valid TP that keeps the frozen target weights under half of one GPU.

    Half leaves room for logits, the draft and its optimizer; the fix ladder can raise it.
    """
    options = tp_options(model, cluster.gpus_per_node, runtime)
    for t in options:
        if weight_bytes_total / t <= cluster.gpu.total_bytes / 2:
            return t
    return options[-1]


def target_weight_bytes(model: ModelShape, spec: RunSpec) -> int:
    """Full, unsharded frozen target weight bytes (MXFP4-packed experts when asked)."""
    return weight_bytes(model, packed=spec.target_weights == "mxfp4")


# ---------------------------------------------------------------- the draft


def check_draft(draft: DraftShape, model: ModelShape) -> None:
    layers = draft.aux_layers
    if len(layers) != AUX_LAYER_COUNT:
        raise FitplanError(
            f"aux_layers {list(layers)}: the Eagle3 draft reads exactly {AUX_LAYER_COUNT} target layers "
            f"(its fc is {AUX_LAYER_COUNT}h -> h); default for {model.name}: {list(model.default_aux_layers())}"
        )
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise FitplanError(f"aux_layers {list(layers)} must be distinct and in increasing order")
    bad = [i for i in layers if not 0 <= i < model.layers]
    if bad:
        raise FitplanError(f"aux_layers {bad} outside the {model.layers} layers of {model.name} (accepted: 0-{model.layers - 1})")
    if draft.hidden != model.hidden:
        raise FitplanError(
            f"draft {draft.name} has hidden size {draft.hidden} but {model.name} has {model.hidden}: "
            "the draft's embedding is a frozen copy of the target's"
        )


# ---------------------------------------------------------------- knobs per runtime


def check_runtime(spec: RunSpec, world: int) -> None:
    check_recompute_mlp(spec)
    check_optimizer_per_param(spec)
    check_split_master(spec)
    check_sum_step_grads(spec, world)
    check_head_grad_in_forward(spec, world)
    check_project_embedding_once(spec, world)
    check_draft_memory(spec)
    check_recompute_norms(spec)
    check_split_attention(spec)
    if spec.runtime == "specforge":
        if spec.workload != "eagle3":
            raise FitplanError("runtime specforge runs the eagle3 workload only; for sft use runtime fitplan")
        for knob, runs in SPECFORGE_KNOBS.items():
            if getattr(spec, knob) != runs:
                raise FitplanError(f"{knob} {getattr(spec, knob)}: SpecForge's train_eagle3.py runs {knob} {runs} "
                                   f"whatever it is told (accepted with --runtime specforge: {runs})")
        return
    if spec.runtime == "speculators":
        check_speculators(spec, world)
        return
    for (knob, value), why in TRAINER_KNOBS.items():
        if getattr(spec, knob) == value:
            raise FitplanError(f"{knob} {value}: {why}")
    if spec.offload == "optimizer":
        check_optimizer_offload(spec, world)
    if spec.sglang_mem_fraction is not None or spec.target_backend != "sglang":
        raise FitplanError("target_backend and sglang_mem_fraction describe the specforge runtime; "
                           "add --runtime specforge, or drop them")
    if spec.offline:  # the trainer reads stored target features (fitplan train --hidden-states)
        if spec.workload != "eagle3":
            raise FitplanError("offline: stored target features train an eagle3 draft; sft has no frozen target "
                               "(drop offline)")
        if spec.tp not in (None, 1):
            raise FitplanError(f"tp {spec.tp}: an offline job runs no target to split, its features come from disk "
                               "(accepted: 1)")
    if world > 1 and spec.sharding not in TRAINER_SHARDINGS:
        raise FitplanError(
            f"sharding {spec.sharding} on {world} GPUs: fitplan's trainer shards the trained model with FSDP2; "
            f"accepted: {', '.join(TRAINER_SHARDINGS)}"
        )


def check_split_attention(spec: RunSpec) -> None:
    """The split TTT attention (trainer/ttt_attention.py) exists in fitplan's eagle3 draft only."""
    if spec.attention != "split":
        return
    if spec.workload != "eagle3":
        raise FitplanError("attention split: splits the eagle3 draft's TTT attention; sft trains a causal model "
                           "(accepted for sft: sdpa, flex, eager)")
    if spec.runtime != "fitplan":
        raise FitplanError(f"attention split: fitplan's trainer's TTT attention; {spec.runtime} runs its own "
                           "(accepted with that runtime: flex, sdpa, eager)")


def check_speculators(spec: RunSpec, world: int) -> None:
    """What speculators' train.py can be told: the knobs it fixes, DDP or FSDP2, Muon or AdamW, and
    one optimizer step per packed sequence."""
    if spec.workload != "eagle3":
        raise FitplanError("runtime speculators runs the eagle3 workload only; for sft use runtime fitplan")
    for knob, (runs, why) in SPECULATORS_KNOBS.items():
        if getattr(spec, knob) != runs:
            given, accepted = (str(v).lower() if isinstance(v, bool) else v for v in (getattr(spec, knob), runs))
            raise FitplanError(f"{knob} {given}: speculators' train.py runs {knob} {accepted} whatever it is told "
                               f"({why}; accepted with --runtime speculators: {accepted})")
    if spec.sharding not in SPECULATORS_SHARDINGS:
        raise FitplanError(f"sharding {spec.sharding}: speculators' train.py replicates the draft with DDP "
                           "(sharding none) or shards it with FSDP2 under --fsdp-shard (sharding zero3); "
                           f"accepted with --runtime speculators: {', '.join(SPECULATORS_SHARDINGS)}")
    if spec.optimizer not in SPECULATORS_OPTIMIZERS:
        raise FitplanError(f"optimizer {spec.optimizer}: speculators' train.py builds torch's Muon (AdamW for the "
                           "non-matrix weights) or AdamW; accepted with --runtime speculators: "
                           f"{', '.join(SPECULATORS_OPTIMIZERS)}")
    if spec.tp not in (None, 1):
        raise FitplanError(f"tp {spec.tp}: speculators' trainer runs no verifier to split (accepted: 1)")
    if spec.accum not in (None, 1) or spec.global_batch not in (None, world):
        raise FitplanError("accum and global_batch: speculators' train.py steps the optimizer after every packed "
                           f"sequence of each GPU (accepted: accum 1, global_batch {world} on {world} GPUs)")
    if spec.target_weights != "bf16" or spec.output_sharding != "gather" or spec.target_backend != "sglang":
        raise FitplanError("target_weights, output_sharding and target_backend describe a live target; "
                           "speculators' trainer runs none (drop them)")


def check_optimizer_offload(spec: RunSpec, world: int) -> None:
    """trainer/offload.py steps one GPU's optimizer on the host, in AdamW's own precision."""
    if world > 1:
        raise FitplanError(f"offload optimizer on {world} GPUs: fitplan's trainer offloads the optimizer of one GPU, "
                           "not of FSDP2 shards (accepted on several GPUs: offload none)")
    if spec.optimizer == "adamw-8bit":
        raise FitplanError("optimizer adamw-8bit with offload optimizer: offloaded moments are in host memory, where "
                           "8 bits save no GPU memory (accepted: one of the two)")


# ---------------------------------------------------------------- the whole job


def resolve_accum(spec: RunSpec, dp: int) -> int:
    if spec.global_batch is None:
        return spec.accum or 1
    per_step = spec.micro_batch * dp
    if spec.global_batch % per_step:
        raise FitplanError(
            f"global_batch {spec.global_batch} is not a multiple of micro_batch {spec.micro_batch} "
            f"x {dp} data-parallel ranks"
        )
    accum = spec.global_batch // per_step
    if spec.accum is not None and spec.accum != accum:
        raise FitplanError(
            f"global_batch {spec.global_batch} and accum {spec.accum} contradict each other "
            f"(micro_batch {spec.micro_batch} x {dp} ranks x accum {spec.accum} = {per_step * spec.accum}); give one"
        )
    return accum


def _target_tp(spec: RunSpec, model: ModelShape, cluster: Cluster) -> int:
    if spec.workload == "sft":
        if spec.tp not in (None, 1):
            raise FitplanError("tp applies to the eagle3 workload's frozen target; for sft use --sharding")
        return 1
    if spec.offline and spec.runtime in ("fitplan", "speculators"):
        return 1  # no target runs: only its lm_head, replicated (check_runtime refuses another tp)
    tp = spec.tp
    if tp is None:
        tp = auto_tp(model, cluster, target_weight_bytes(model, spec), spec.runtime)
    check_tp(model, cluster, tp, spec.runtime)
    return tp


def resolve(spec: RunSpec) -> Job:
    """RunSpec -> Job: every rule of the job checked, tp and accum chosen."""
    model = load_model(spec.model)
    cluster = parse_gpus(spec.gpus)
    warnings = []
    if model.max_positions and spec.seq > model.max_positions:
        warnings.append(f"seq {spec.seq} exceeds {model.name}'s max_position_embeddings {model.max_positions}")
    if spec.target_weights == "mxfp4" and model.packed_format != "mxfp4":
        raise FitplanError(f"target_weights mxfp4: {model.name} has no MXFP4-packed weights (accepted: bf16)")
    check_runtime(spec, cluster.world)
    draft = None
    if spec.workload == "eagle3":
        if spec.runtime == "speculators":  # the draft speculators builds from the verifier
            from fitplan.speculators import draft_shape

            draft = draft_shape(spec.draft, model, spec.aux_layers)
        else:
            draft = load_draft(spec.draft, model, spec.aux_layers)
        check_draft(draft, model)
    tp = _target_tp(spec, model, cluster)
    if spec.output_sharding == "all-to-all" and tp == 1:
        warnings.append("output_sharding all-to-all has no effect with tp 1")
    accum = resolve_accum(spec, cluster.world)
    return Job(spec=spec, model=model, draft=draft, cluster=cluster, tp=tp, accum=accum, warnings=tuple(warnings))


def lean_draft(spec: RunSpec) -> bool:
    """Whether fitplan's trainer runs the lean Eagle3 draft, its head fused with the loss (RunSpec
    draft_memory; None: lean wherever there is such a draft)."""
    return _all_hold(_draft_memory_needs(spec)) and spec.draft_memory != "plain"


def fused_norms(job: Job) -> bool:
    """Whether fitplan's lean draft runs its norms fused with their projections (RunSpec
    recompute_norms, trainer/norm_project.py; None: wherever the draft is lean)."""
    return lean_draft(job.spec) and job.spec.recompute_norms is not False


def check_draft_memory(spec: RunSpec) -> None:
    """draft_memory given where fitplan's trainer runs no Eagle3 draft (sft, another runtime's
    draft): refused rather than ignored, lean and plain alike (neither says what that job keeps)."""
    if spec.draft_memory is not None:
        _refuse_unless("draft_memory", "lays out fitplan's eagle3 draft", _draft_memory_needs(spec), off="auto")


def _draft_memory_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {"runtime": _is(spec.runtime, "fitplan"), "workload": _is(spec.workload, "eagle3")}


def check_recompute_norms(spec: RunSpec) -> None:
    """recompute_norms true where no lean draft keeps norms to recompute: refused rather than
    ignored (the user would count on a memory saving the job does not make)."""
    if spec.recompute_norms:
        _refuse_unless("recompute_norms", "makes the norms again in backward in fitplan's eagle3 lean draft",
                      _recompute_norms_needs(spec), off="false or auto")


def _recompute_norms_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {**_draft_memory_needs(spec),
            "draft_memory": (spec.draft_memory, spec.draft_memory != "plain", "lean or auto")}


def shares_target_embedding(job: Job) -> bool:
    """Whether the draft's frozen embedding is the live target's own tensor (RunSpec
    share_embedding): only where the target holds it whole on this rank, unsharded (tp 1) and
    loaded (not from stored features, where only the draft keeps one)."""
    spec = job.spec
    return (spec.runtime == "fitplan" and spec.workload == "eagle3" and spec.share_embedding
            and not spec.offline and job.tp == 1)


def sums_step_grads(job: Job) -> bool:
    """Whether the lean draft's fused functions sum each weight's gradient over the TTT steps in
    one buffer (RunSpec sum_step_grads, trainer/step_grads.py; None: wherever it can)."""
    spec = job.spec
    return spec.sum_step_grads is not False and _all_hold(_sum_step_grads_needs(spec, job.world))


def _sum_step_grads_needs(spec: RunSpec, world: int) -> dict[str, tuple[object, bool, str]]:
    """Where the steps' gradients are summed: the eagle3 lean draft with fused norms (as for
    recompute_mlp), not under `mixed`, whose hooks move each step's gradient into an fp32 one as
    it arrives (a bf16 sum held through backward would come on top), on one GPU: under FSDP each
    call's gradient is reduce-scattered and freed as its unit's backward ends, so a sum held over
    the unroll would keep every unit's whole gradient through backward instead of its shard."""
    return {**_recompute_mlp_needs(spec),
            "precision": (spec.precision, spec.precision != "mixed", "other than mixed"),
            "GPUs": (world, world == 1, "1")}


def check_recompute_mlp(spec: RunSpec) -> None:
    """recompute_mlp is a way of fitplan's lean draft with fused norms; refused elsewhere rather
    than ignored (the job would keep what the user asked it not to)."""
    if spec.recompute_mlp:
        _refuse_unless("recompute_mlp", "runs in fitplan's eagle3 lean draft with fused norms",
                      _recompute_mlp_needs(spec), off="false")


def can_recompute_mlp(spec: RunSpec) -> bool:
    """Whether the layout has an MLP for recompute_mlp to recompute (where it is not refused)."""
    return _all_hold(_recompute_mlp_needs(spec))


def _recompute_mlp_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {**_recompute_norms_needs(spec),
            "recompute_norms": (spec.recompute_norms, spec.recompute_norms is not False, "true or auto")}


def check_optimizer_per_param(spec: RunSpec) -> None:
    """optimizer_per_param true where no fp32 copy of every gradient is made: refused rather
    than ignored (the user would count on a memory saving the job does not make)."""
    if spec.optimizer_per_param:
        _refuse_unless("optimizer_per_param", "steps the bf16-master optimizer on the GPU a parameter at a time",
                      _copies_every_grad_needs(spec), off="false or auto")


def check_split_master(spec: RunSpec) -> None:
    """split_master true where the optimizer holds no fp32 master on the GPU, or another
    optimizer steps it: refused rather than ignored."""
    if spec.split_master:
        _refuse_unless("split_master", "holds each bf16-master AdamW master as its bf16 parameter and 16 low bits",
                      _split_master_needs(spec), off="false or auto")


def check_sum_step_grads(spec: RunSpec, world: int) -> None:
    """sum_step_grads true where no fused function sums the steps' gradients: refused rather
    than ignored (the user would count on a memory saving the job does not make)."""
    if spec.sum_step_grads:
        _refuse_unless("sum_step_grads", "sums the TTT steps' gradients in fitplan's eagle3 lean draft with "
                      "fused norms on one GPU", _sum_step_grads_needs(spec, world), off="false or auto")


def _refuse_unless(knob: str, does: str, needs: dict[str, tuple[object, bool, str]], off: str) -> None:
    """A knob given in a layout where it does nothing: one line naming the knob, the first
    layout knob that rules it out, and what is accepted. `needs`: layout knob -> (its value,
    whether that value lets the knob act, the values that do); `off`: the knob's values accepted
    in any layout ("auto": null, which does nothing where the knob does nothing)."""
    for name, (given, holds, accepted) in needs.items():
        if not holds:
            wanted = ", ".join(f"{n} {a}" for n, (_, _, a) in needs.items())
            raise FitplanError(f"{knob}: {does}, not with {name} {_shown(given)} (accepted: {knob} {off}, or {wanted})")


def _all_hold(needs: dict[str, tuple[object, bool, str]]) -> bool:
    return all(holds for _, holds, _ in needs.values())


def _is(given: object, needed: object) -> tuple[object, bool, str]:
    return given, given == needed, _shown(needed)


def _shown(value: object) -> str:
    if value is None:
        return "auto"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_head_grad_in_forward(spec: RunSpec, world: int) -> None:
    """head_grad_in_forward true where the steps' gradients are not summed (the head makes its
    gradients in forward into those sums): refused rather than ignored."""
    if spec.head_grad_in_forward:
        _refuse_unless("head_grad_in_forward", "makes the head's gradients in forward into the steps' summed "
                      "gradients", _head_grad_in_forward_needs(spec, world), off="false or auto")


def _head_grad_in_forward_needs(spec: RunSpec, world: int) -> dict[str, tuple[object, bool, str]]:
    return {**_sum_step_grads_needs(spec, world),
            "sum_step_grads": (spec.sum_step_grads, spec.sum_step_grads is not False, "true or auto")}


def head_grads_in_forward(job: Job) -> bool:
    """Whether the fused head makes its gradients in forward (RunSpec head_grad_in_forward,
    trainer/head_loss.py; None: wherever the steps sum their gradients)."""
    return sums_step_grads(job) and job.spec.head_grad_in_forward is not False


def check_project_embedding_once(spec: RunSpec, world: int) -> None:
    """project_embedding_once true where the steps' gradients are not summed (the embedding
    half's weight gradients join those sums) or one step has nothing to share: refused rather
    than ignored."""
    if spec.project_embedding_once:
        _refuse_unless("project_embedding_once", "projects the embedding's half of q/k/v once per unroll into the "
                      "steps' summed gradients", _project_embedding_once_needs(spec, world), off="false or auto")


def _project_embedding_once_needs(spec: RunSpec, world: int) -> dict[str, tuple[object, bool, str]]:
    return {**_head_grad_in_forward_needs(spec, world), "ttt": (spec.ttt, spec.ttt > 1, "2 or more")}


def projects_embedding_once(job: Job) -> bool:
    """Whether the draft projects the embedding's half of its q/k/v input once per unroll
    (RunSpec project_embedding_once, trainer/embedding_projection.py; None: wherever it applies):
    where the steps sum their gradients, whose last backward call adds that half's weight
    gradients into the sums, over 2 or more steps (one step has no rows to share: the projection
    and its fp32 gradient would only add to its embedding)."""
    spec = job.spec
    return spec.project_embedding_once is not False and _all_hold(_project_embedding_once_needs(spec, job.world))


def recomputes_mlp(job: Job) -> bool:
    """Whether the lean draft's MLP keeps only its input and makes gate and up again in backward
    (RunSpec recompute_mlp, trainer/recompute_mlp.py): fused norms only, where the
    post-attention norm's input is what the MLP already keeps."""
    return fused_norms(job) and job.spec.recompute_mlp


def copies_every_grad(spec: RunSpec) -> bool:
    """Whether the step copies every bf16 gradient to fp32 (trainer/optim.py MasterWeightAdamW):
    fitplan's trainer under bf16-master with the optimizer on the GPU and the masters whole in
    fp32 (not split), where stepping a parameter at a time (RunSpec optimizer_per_param) applies."""
    return _all_hold(_copies_every_grad_needs(spec))


def _copies_every_grad_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {**_master_on_device_needs(spec),
            "split_master": (spec.split_master, not splits_master(spec), "false")}


def _master_on_device_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {"runtime": _is(spec.runtime, "fitplan"), "precision": _is(spec.precision, "bf16-master"),
            "offload": _is(spec.offload, "none")}


def splits_master(spec: RunSpec) -> bool:
    """Whether the bf16-master optimizer holds each master as its bf16 parameter and 16 low bits,
    stepped from the bf16 gradient (RunSpec split_master, trainer/split_master.py; None: wherever
    it applies): fitplan's trainer, bf16-master, the optimizer on the GPU, torch's AdamW (the
    8-bit AdamW steps fp32 masters of its own)."""
    return spec.split_master is not False and _all_hold(_split_master_needs(spec))


def _split_master_needs(spec: RunSpec) -> dict[str, tuple[object, bool, str]]:
    return {**_master_on_device_needs(spec), "optimizer": _is(spec.optimizer, "adamw")}


def steps_per_param(spec: RunSpec) -> bool:
    """Whether MasterWeightAdamW steps one parameter at a time (RunSpec optimizer_per_param,
    trainer/optim.py)."""
    return copies_every_grad(spec) and per_param_optimizer(spec)


def per_param_optimizer(spec: RunSpec) -> bool:
    """RunSpec optimizer_per_param, its default (None) resolved: on for the Eagle3 draft, whose
    dozen tensors step one at a time in no more time, off for sft, whose hundreds cost one
    optimizer call each (docs/benchmarks.md)."""
    if spec.optimizer_per_param is None:
        return spec.workload == "eagle3"
    return spec.optimizer_per_param
