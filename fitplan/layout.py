"""Resolve a RunSpec against the profiles into a Job: shapes, GPUs and the parallel layout.

This is where checks that need the model or the GPUs live (tp must divide the heads and the
GPUs of a node, the global batch must split over the data-parallel ranks, ...). Everything
downstream (estimator, step-time model, ladder, trainer) takes a Job.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.profiles import Cluster, DraftShape, ModelShape, load_draft, load_model, parse_gpus


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


def _divisors_tp(model: ModelShape, gpus_per_node: int) -> list[int]:
    """TP sizes that are valid for this model on one node, smallest first."""
    return [
        t
        for t in range(1, gpus_per_node + 1)
        if gpus_per_node % t == 0 and model.heads % t == 0 and (model.kv_heads % t == 0 or t % model.kv_heads == 0)
    ]


def check_tp(model: ModelShape, cluster: Cluster, tp: int) -> None:
    accepted = ", ".join(map(str, _divisors_tp(model, cluster.gpus_per_node)))
    if cluster.gpus_per_node % tp:
        raise FitplanError(f"tp {tp} does not divide the {cluster.gpus_per_node} GPUs per node; accepted: {accepted}")
    if model.heads % tp:
        raise FitplanError(
            f"tp {tp} does not divide the {model.heads} attention heads of {model.name}; accepted: {accepted}"
        )
    if model.kv_heads % tp and tp % model.kv_heads:
        raise FitplanError(
            f"tp {tp} neither divides nor is a multiple of the {model.kv_heads} KV heads of {model.name}"
        )


def auto_tp(model: ModelShape, cluster: Cluster, weight_bytes: int) -> int:
    """Smallest valid TP that keeps the frozen target weights under half of one GPU.

    Half leaves room for logits, the draft and its optimizer; the fix ladder can raise it.
    """
    options = _divisors_tp(model, cluster.gpus_per_node)
    for t in options:
        if weight_bytes / t <= cluster.gpu.total_bytes / 2:
            return t
    return options[-1]


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


def resolve(spec: RunSpec, target_weight_bytes=None) -> Job:
    """RunSpec -> Job. `target_weight_bytes(model, spec)` sizes the target for auto TP."""
    model = load_model(spec.model)
    cluster = parse_gpus(spec.gpus)
    warnings = []
    if model.max_positions and spec.seq > model.max_positions:
        warnings.append(f"seq {spec.seq} exceeds {model.name}'s max_position_embeddings {model.max_positions}")
    if spec.target_weights == "mxfp4" and model.packed_format != "mxfp4":
        raise FitplanError(f"target_weights mxfp4: {model.name} has no MXFP4-packed weights (accepted: bf16)")
    draft = None
    if spec.workload == "eagle3":
        draft = load_draft(spec.draft, model, spec.aux_layers)
        bad = [i for i in draft.aux_layers if not 0 <= i < model.layers]
        if bad:
            raise FitplanError(f"aux_layers {bad} outside the {model.layers} layers of {model.name}")
        if spec.tp is None:
            size = target_weight_bytes(model, spec) if target_weight_bytes else 0
            tp = auto_tp(model, cluster, size)
        else:
            tp = spec.tp
        check_tp(model, cluster, tp)
    else:
        if spec.tp not in (None, 1):
            raise FitplanError("tp applies to the eagle3 workload's frozen target; for sft use --sharding")
        tp = 1
    if spec.output_sharding == "all-to-all" and tp == 1:
        warnings.append("output_sharding all-to-all has no effect with tp 1")
    accum = resolve_accum(spec, cluster.world)
    return Job(spec=spec, model=model, draft=draft, cluster=cluster, tp=tp, accum=accum, warnings=tuple(warnings))
