"""The fix ladder per runtime: each runtime is offered only the rungs it can be told to take, and
the GPU-count suggestion lays the job out the way that runtime runs on more GPUs (docs/fit.md).

speculators' train.py (fitplan.layout.SPECULATORS_KNOBS) packs one sequence of --total-seq-len
tokens a step (no micro-batch to halve, no accumulation), runs no activation checkpointing, no
verifier (nothing to split with TP or gather logits from), Muon or AdamW (no 8-bit moments) and no
offload. What it can be told: PYTORCH_CUDA_ALLOC_CONF (expandable segments), --draft-attn-impl
(attention) and --fsdp-shard (sharding none -> zero3). More GPUs are data parallel only: tp stays
1, each GPU trains one more sequence a step, and the draft is sharded with FSDP2 (DDP replicas
save nothing per GPU).
"""

from __future__ import annotations

from fitplan.config import RunSpec
from fitplan.estimator import estimate
from fitplan.estimator.result import Estimate
from fitplan.ladder import SPECULATORS_RUNGS, fit
from fitplan.layout import resolve

GIB, MIB = 1 << 30, 1 << 20
# H100 80 GB as torch reports it (profiles/gpus, measured); a plan must peak at or below 95% of it.
H100_TOTAL = 85_017_493_504


def speculators_job(**changes) -> RunSpec:
    """What --from-speculators makes of `python scripts/train.py --verifier-name-or-path
    meta-llama/Llama-3.1-8B --total-seq-len 8192 --optimizer adamw` (one GPU, DDP)."""
    return RunSpec(**{"model": "llama-3.1-8b", "draft": "speculators", "gpus": "1xH100", "runtime": "speculators",
                      "seq": 8192, "ttt": 3, "precision": "fp32-autocast", "offline": True, "sharding": "none",
                      "optimizer": "adamw", "tp": 1, **changes})


def sharded_state_estimator(state_gib: float):
    """A hand-made memory model per GPU: the draft's state (fp32 weights, grads, moments),
    replicated unless sharding is zero2/zero3 (then 1/world of it), plus 1 MiB of activations a
    token. No reserve and nothing outside the allocator."""

    def estimate(job) -> Estimate:
        s = job.spec
        shards = job.world if s.sharding in ("zero2", "zero3") else 1
        components = {"optimizer.moments": int(state_gib * GIB) // shards, "activations.draft": s.seq * MIB}
        return Estimate(phases={"backward": components}, step1_phases={"backward": components},
                        gpu_total_bytes=job.cluster.gpu.total_bytes, allocator_reserve_bytes=0,
                        outside_allocator_bytes=0, largest_allocation_bytes=max(components.values()),
                        largest_allocation_name="optimizer.moments")

    return estimate


def test_a_speculators_job_is_offered_only_its_runtimes_rungs():
    # 100 GiB of state + 8192 MiB (8 GiB) of activations = 108 GiB on one GPU, over 75.22 GiB;
    # sharding zero3 on one GPU keeps all of it (1/1), so nothing on the ladder fits
    result = fit(speculators_job(), estimate_fn=sharded_state_estimator(100))
    assert result.chosen is None
    assert {e.rung for e in result.trail} <= {"original", *SPECULATORS_RUNGS}
    assert {e.change for e in result.trail} == {"(as given)", "expandable_segments on", "sharding zero3",
                                                "expandable_segments on; sharding zero3"}
    # no micro-batch, ac, tp, 8-bit optimizer or offload candidate: none is proposed, none refused
    assert result.refused == ()


def test_a_speculators_job_that_oom_on_one_gpu_fits_on_two_by_sharding():
    # 1 GPU: 100 + 8 = 108 GiB > 0.95 x 79.18 = 75.22 GiB, with DDP or FSDP2 alike.
    # 2 GPUs, DDP: every GPU still holds 108 GiB. FSDP2 (zero3): 100 / 2 + 8 = 58 GiB <= 75.22.
    # The suggestion is data parallel: tp 1, one sequence per GPU (global batch 2), FSDP2.
    estimator = sharded_state_estimator(100)
    result = fit(speculators_job(), estimate_fn=estimator)
    assert result.min_gpus == "2xH100-SXM-80GB"
    assert result.max_seq is None  # 100 GiB of state alone is over 75.22 GiB at any length
    two = resolve(speculators_job(gpus="2xH100", sharding="zero3"))
    assert (two.tp, two.global_batch, two.accum) == (1, 2, 1)
    assert estimator(two).peak_reserved_bytes == 58 * GIB
    assert estimator(resolve(speculators_job(gpus="2xH100"))).peak_reserved_bytes == 108 * GIB


def test_an_offline_fitplan_job_gets_more_gpus_at_tp_1():
    # fitplan's trainer on stored features runs no target (tp 1, docs/cli.md); the suggestion
    # used to raise tp to the node's largest, which that job refuses, and so never came.
    # 2 GPUs, global batch 2 kept as micro-batch 1 each, FSDP2 zero2: 100 / 2 + 8 = 58 GiB.
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=8192, micro_batch=2, global_batch=2, offline=True, tp=1)
    result = fit(spec, estimate_fn=sharded_state_estimator(100))
    assert result.chosen is None and result.min_gpus == "2xH100-SXM-80GB"


# ---------------------------------------------------------------- with the estimator, by hand

# Llama-3.1-405B as speculators' draft sees it (docs/estimate.md, "speculators runtime"):
# h 16384, 128 heads of 128, 8 KV heads, MLP 53248, vocabulary 128256 kept whole.
h, H, HKV, D, I, V = 16384, 128, 8, 128, 53248, 128256
T = 1024  # --total-seq-len
FC = 3 * h * h  # 805,306,368
ATTENTION = 2 * h * (H + 2 * HKV) * D + H * D * h  # q, k, v read the 2h-wide input: 872,415,232
LAYER = ATTENTION + 3 * h * I + 3 * h  # the decoder layer and its three norms: 3,489,710,080
ROOT = FC + h  # fc and the final norm: 805,322,752
TRAINED = LAYER + ROOT  # 4,295,032,832
FROZEN = V * h + 2 * V * h + h  # embedding, the two [V, h] heads, the verifier norm: 6,304,055,296
WEIGHTS, GRADS, ADAMW = 4 * (TRAINED + FROZEN), 4 * TRAINED, 8 * TRAINED  # all fp32
BATCH = T * (2 * 4 * h + 3 * 8 + 1)  # aux [T, 3h] + last [T, h] bf16, three int64 ids, a bool mask
WORKSPACE = 32 * MIB  # cuBLAS


def test_a_405b_draft_is_suggested_four_gpus_by_hand():
    spec = RunSpec(model="llama-3.1-405b", draft="speculators", gpus="1xH100", runtime="speculators", seq=T, ttt=3,
                   precision="fp32-autocast", offline=True, sharding="none", optimizer="adamw", tp=1)
    result = fit(spec)
    # One GPU: at the optimizer step the fp32 weights, grads and both AdamW moments are all there,
    # 42,396,352,512 + 17,180,131,328 + 34,360,262,656 = 93,936,746,496 B > 85,017,493,504: no rung
    # speculators runs changes that (FSDP2 on one GPU keeps 1/1 of it)
    assert WEIGHTS + GRADS + ADAMW == 93_936_746_496 > H100_TOTAL
    assert result.chosen is None and result.refused == ()
    assert {e.rung for e in result.trail} <= {"original", *SPECULATORS_RUNGS}
    assert result.original.estimate.phase_allocated("optimizer_step") == \
        WEIGHTS + GRADS + ADAMW + ADAMW // 2 + BATCH + WORKSPACE  # AdamW's step: sqrt of the 2nd moments
    # FSDP2 on N GPUs, at the end of backward: 1/N of the state, the root (fc, final norm and the
    # frozen tensors) gathered in bf16, the layer gathered in bf16, and the layer's bf16 grads beside
    # their fp32 reduce-scatter copy (the largest unit: 6 B a parameter)
    def backward(n: int) -> int:
        comm = 2 * (ROOT + FROZEN) + 2 * LAYER + 6 * LAYER  # 42,136,436,736
        return (WEIGHTS + GRADS + ADAMW) // n + comm + BATCH + WORKSPACE

    two = resolve(spec.replace(gpus="2xH100", sharding="zero3", global_batch=None))
    four = resolve(spec.replace(gpus="4xH100", sharding="zero3", global_batch=None))
    assert estimate(two).phase_allocated("backward") == backward(2) == 89_272_607_744 > H100_TOTAL  # 2: OOM
    assert estimate(four).phase_allocated("backward") == backward(4) == 65_788_421_120  # 61.3 GiB
    # 4 GPUs, data parallel: tp 1, one sequence per GPU a step, the draft sharded with FSDP2; 61.3 GiB
    # + the allocator reserve and the CUDA context is under 0.95 x 79.18 GiB (the candidate tried
    # carries the ladder's expandable segments, so the reserve is no fragmentation risk)
    assert result.min_gpus == "4xH100-SXM-80GB"
    assert (four.tp, four.global_batch, four.spec.sharding) == (1, 4, "zero3")
