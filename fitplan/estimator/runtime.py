"""Runtime constants: memory the training math does not explain. All calibration lives here.

Sources: profiles/gpus.json `runtime_overheads` (measured with torch 2.11.0+cu130, CUDA 13.0,
driver 580.159.04, NCCL 2.28.9, NVLink multicast off) and the literature cited there.
"""

from __future__ import annotations

from fitplan.layout import Job, lean_draft
from fitplan.units import BF16, GIB, MIB

# --- outside the allocator -----------------------------------------------------------------
# CUDA context with lazy module loading: 554,500,096 B measured on H100 80GB HBM3 (528.8 MiB),
# 554,565,632 B on H200 (gpus.json runtime_overheads.cuda_context.measured_here).
CUDA_CONTEXT_BYTES = 554_500_096
# First bf16 GEMM loads kernels outside the allocator: +68 MiB; first SDPA: +8 MiB (same source).
FIRST_KERNELS_BYTES = (68 + 8) * MIB
# fitplan's trainer compiles flex attention (or the split attention's diagonal passes and the
# lean draft's elementwise kernels beside it): its Triton kernels add 142 MiB outside the allocator
# (device_used - reserved: 618.8 MiB after loading, 760.8 MiB from step 1 on, in every
# tests/data/gpu/{llama,qwen3,gptoss}-*.json report, H100).
COMPILED_FLEX_KERNELS_BYTES = 142 * MIB
# After NCCL init, the first elementwise kernels added 92 MiB (same source).
KERNELS_AFTER_NCCL_BYTES = 92 * MIB
# First collective on a communicator: +840 MiB on 2 and on 4 H200 ranks (gpus.json nccl).
NCCL_FIRST_COLLECTIVE_BYTES = 840 * MIB
# Each additional communicator's first all-reduce: +484 MiB (2 ranks), +486 MiB (4 ranks).
NCCL_EXTRA_COMMUNICATOR_BYTES = 486 * MIB
# First all-to-all, by group size: +446 MiB (2 ranks), +1214 MiB (4 ranks) measured; 8 ranks:
# NVIDIA/nccl#1685 saw 1.06 GB -> 4.34 GB after the first all_to_all_single on 8xH100, i.e.
# ~3.3 GB more; gpus.json's planning default for 8 GPUs is 3.3 GiB.
NCCL_ALL_TO_ALL_BYTES = {2: 446 * MIB, 4: 1214 * MIB, 8: int(3.3 * GIB)}

# --- inside the allocator ------------------------------------------------------------------
# cuBLAS workspace taken through the PyTorch allocator: 32 MiB (gpus.json cuda_context).
CUBLAS_WORKSPACE_BYTES = 32 * MIB

# --- between allocated and reserved --------------------------------------------------------
# The caching allocator rounds blocks up (2 MiB segments for large allocations) and keeps freed
# blocks cached that later shapes do not fit; published planners that compare with allocated
# memory miss 8-33% (docs/estimate.md, "Runtime").
#
# fitplan's Eagle3 trainer (trainer/draft.py builds no dense TTT mask, so no S^2*L term):
# - 9.7 B per token and draft-vocab entry: about one more per-step logits tail (bf16 logits +
#   fp32 cross-entropy product, 6*Vd per token) that stays cached beside the live one. Fitted,
#   as the largest ratio, on the three H100 reports whose mask term was small (<= 0.13 GiB),
#   tests/data/gpu/{llama-2k-mb1,llama-2k-mb2,gptoss-2k-mb1}.json: reserved - allocated 0.56,
#   1.15, 0.59 GiB = 9.2, 9.4, 9.7 B per entry. Those runs still materialised the dense TTT
#   mask, so the fit is an upper bound. Not re-checked: qwen3-8k-mb1
#   (4.03 GiB, 16.5 B, its 8k dense mask included) and llama-8k-mb1-ac (6.79 GiB, checkpointing).
# - With TP the output exchange (trainer/parallel/outputs.py) frees, each step, full-vocab blocks
#   that the draft's tensors fit only in part, so they stay cached: 2.5 own-rows blocks
#   [B*S, V] bf16 in either mode, and in gather mode 0.75 more per extra gathered block
#   ((tp-1)*[B*S, V]: the all-gather buffer and its row-ordered copy are tp*[B*S, V] each).
#   Reserved - allocated per rank = measured device - measured peak allocated - outside the
#   allocator (below), tests/data/gpu/multi_train_x{2,4}.jsonl, less the draft term above, in
#   own-rows blocks: all-to-all 2.36 / 1.91 / 1.39 (qwen3-8b tp2 S4096, tp2 S8192, tp4 S8192),
#   1.90 (gpt-oss-120b tp4 S4096); gather 2.84 / 2.13 / 2.13 (tp2 b2 S4096) / 4.42, 5.37 (gpt-oss).
#   Fitted on the qwen3-8b runs: 2.5 covers every all-to-all run, 0.75 covers (4.42 - 2.5) / 3 of
#   tp4 gather with room; checked on gpt-oss-120b (another model, vocab and MoE target):
#   all-to-all 2.5 >= 1.90, gather 2.5 + 3 * 0.75 = 4.75 < 5.37, i.e. 0.95 GiB under on 82 GiB.
TRAINER_RESERVE_PER_TOKEN_VOCAB = 9.7
EXCHANGE_RESERVE_OWN_BLOCKS = 2.5
GATHER_RESERVE_PER_EXTRA_BLOCK = 0.75
# Other runtimes (not measured yet): 5% of the peak allocated bytes plus 256 MiB of rounding,
# and 2% + 64 MiB with expandable_segments (which maps pages instead of caching whole segments).
RESERVE_FRACTION = 0.05
RESERVE_ROUNDING_BYTES = 256 * MIB
# What is left of any reserve when memory runs short (reserve_floor_bytes): 2% + 256 MiB.
RESERVE_FLOOR_FRACTION = 0.02
EXPANDABLE_RESERVE_FRACTION = 0.02
EXPANDABLE_ROUNDING_BYTES = 64 * MIB
# The sft job (plain transformers + fused AdamW), without expandable_segments, adds the logits'
# blocks that stay cached: each step frees its bf16 logits, fp32 upcast and fp32 log-softmax
# [B*S, V] (one segment each, larger than any cached grad block), and backward splits those
# segments with grads and its own fp32 [B*S, V] gradients, so next step's logits get new ones.
# Fitted on the one measured sft calibration row, tests/data/gpu/validation/h200x1/
# h200x1-sft-qwen3-8b-s8k-b1-ac-bf16.json: reserved - allocated at steps >= 2 is 14,136,723,456 B;
# less 5% + 256 MiB that leaves 10,526,257,664 B = 8.46 B per [B*S, V] entry, about two fp32
# logits blocks; rounded up (an under-prediction is an OOM the user was not warned of).
# Check rows (not fitted): llama-3.1-8b 4k b2 ac 8.17 B, llama-3.1-8b 2k b1 no ac 10.5 B.
# Near the device limit this reserve is not what decides an OOM: the allocator frees cached
# segments and retries before failing, so it fails only when fragmentation leaves no block for
# one request (qwen3-8b b4 ac: seq 8960 OOMed on a 20.29 GiB request with 23.6 GiB cached, seq
# 9984 ran with 7.2 GiB cached). Only expandable_segments makes that edge predictable.
SFT_CACHED_LOGITS_BYTES_PER_ENTRY = 8.5
# The cache stops growing with the logits: once they are large the next step's logits reuse the
# freed segments of the same size. Session-2 rows (tests/data/gpu/validation/h200x4*_rows.jsonl),
# cache = measured device - allocated - outside - (5% + 256 MiB): up to ~2e9 entries the line
# above holds (check rows: llama 4k b2 8.2 GiB vs 8.3, llama 16k fp32-autocast 16.2 vs 16.6);
# beyond, it does not (calibration row llama 8k b2 zero3, 2.1e9 entries: 12.2 GiB where the line
# says 16.6; check rows with 2.5e9-6.1e9 entries: 13.7, 9.2, 3.2, 0.8 GiB). Capped at the largest
# cache of an sft calibration row: 13.5 GiB (gpt-oss-20b zero3 4k, flex attention).
SFT_CACHED_LOGITS_MAX_BYTES = int(13.5 * GIB)
# Blocks of the largest request that fragmentation can strand near the limit (stranded_block_bytes).
STRANDED_LARGEST_BLOCKS = 2


def all_to_all_bytes(group: int) -> int:
    """First all-to-all's NCCL buffers for a group; sizes between known ones take the next larger."""
    known = sorted(NCCL_ALL_TO_ALL_BYTES)
    for size in known:
        if group <= size:
            return NCCL_ALL_TO_ALL_BYTES[size]
    return NCCL_ALL_TO_ALL_BYTES[known[-1]] * group // known[-1]  # grows with the peers


def uses_all_to_all(job: Job) -> bool:
    return job.spec.workload == "eagle3" and job.spec.output_sharding == "all-to-all" and job.tp > 1


def communicators(job: Job) -> int:
    """NCCL communicators a rank joins: the world, and a separate TP group when it is smaller."""
    if job.world == 1:
        return 0
    return 1 + (1 if 1 < job.tp < job.world else 0)


def runs_fitplan_trainer(job: Job) -> bool:
    return job.spec.workload == "eagle3" and job.spec.runtime == "fitplan"


def outside_allocator_bytes(job: Job) -> int:
    total = CUDA_CONTEXT_BYTES + FIRST_KERNELS_BYTES
    if runs_fitplan_trainer(job) and job.spec.attention_impl in ("flex", "split"):
        total += COMPILED_FLEX_KERNELS_BYTES
    comms = communicators(job)
    if comms:
        total += NCCL_FIRST_COLLECTIVE_BYTES + (comms - 1) * NCCL_EXTRA_COMMUNICATOR_BYTES
        total += KERNELS_AFTER_NCCL_BYTES
    if uses_all_to_all(job):
        total += all_to_all_bytes(job.tp)
    return total


def trainer_reserve_bytes(job: Job, peak_allocated: int) -> int:
    """Reserved - allocated of fitplan's Eagle3 trainer without expandable segments (fitted above).

    The lean draft (draft_memory lean) makes no per-step logits blocks for the allocator to keep
    cached; its reserve is the general one. Measured on an H200 (reserved - allocated at the
    peak, steady state; tests/data/gpu/lean/): llama-3.2-1b s4096 0.16-0.25 GiB (general: 0.64),
    llama-3.1-8b s16384 2.60 GiB (general: 2.32), gemma-3-12b s2048 1.38 GiB (general: 1.89).
    """
    spec = job.spec
    tokens = spec.micro_batch * spec.seq
    if lean_draft(spec):
        reserve = RESERVE_FRACTION * peak_allocated + RESERVE_ROUNDING_BYTES
    else:
        reserve = TRAINER_RESERVE_PER_TOKEN_VOCAB * tokens * job.draft.draft_vocab
    if job.tp > 1:
        own_block = BF16 * tokens * job.model.vocab
        extra_blocks = job.tp - 1 if spec.output_sharding == "gather" else 0
        reserve += own_block * (EXCHANGE_RESERVE_OWN_BLOCKS + GATHER_RESERVE_PER_EXTRA_BLOCK * extra_blocks)
    return int(reserve)


def sft_cached_logits_bytes(job: Job) -> int:
    """Freed logits blocks the sft job keeps cached without expandable segments (fitted above)."""
    spec = job.spec
    cached = int(SFT_CACHED_LOGITS_BYTES_PER_ENTRY * spec.micro_batch * spec.seq * job.model.vocab)
    return min(cached, SFT_CACHED_LOGITS_MAX_BYTES)


def expandable_reserve_bytes(peak_allocated: int) -> int:
    """The reserve with expandable_segments, which maps pages instead of caching whole segments."""
    return int(EXPANDABLE_RESERVE_FRACTION * peak_allocated) + EXPANDABLE_ROUNDING_BYTES


def allocator_reserve_bytes(job: Job, peak_allocated: int) -> int:
    if job.spec.expandable_segments:
        return expandable_reserve_bytes(peak_allocated)
    if runs_fitplan_trainer(job):
        return trainer_reserve_bytes(job, peak_allocated)
    general = int(RESERVE_FRACTION * peak_allocated) + RESERVE_ROUNDING_BYTES
    return general + (sft_cached_logits_bytes(job) if job.spec.workload == "sft" else 0)


def reserve_floor_bytes(job: Job, peak_allocated: int) -> int:
    """The reserve a job keeps however short memory is: block rounding and segments split by live
    tensors (the allocator frees every wholly cached segment and retries before an OOM). Below the
    smallest squeezed reserve measured, in rows that ran within a few GiB of the H200's total:
    2.7% of the peak allocated bytes (gpt-oss-120b tp2 gather seq 7168, 131.9 GiB allocated, device
    137.7 of 139.8 GiB) and 5.7% (sft qwen3-8b b4 seq 9984); with expandable_segments, 0.7%
    (sft qwen3-8b b4 seq 10752). tests/data/gpu/validation/*rows*.jsonl. Not a guarantee: the sft
    job at seq 8960 failed a 20.29 GiB request with 23.6 GiB cached in split segments."""
    if job.spec.expandable_segments:
        return expandable_reserve_bytes(peak_allocated)
    return int(RESERVE_FLOOR_FRACTION * peak_allocated) + RESERVE_ROUNDING_BYTES


def stranded_block_bytes(job: Job, largest_allocation: int) -> int:
    """What fragmentation can keep from the job's largest request without expandable segments.

    Near the limit the allocator frees every wholly cached segment and retries before it fails,
    but freed blocks split by smaller live tensors stay (the lazily created optimizer state of
    step 1 is one such tensor: three of the five failures below came at step 2, two in step 1's
    target forward, between one layer's eager attention scores and the next), so the largest
    request needs a new segment on top. Five near-limit OOMs of the matrix, with the device not
    full, failed that way; cached but unallocated at the failure, in blocks of the failed request:
    1.16 (sft qwen3-8b b4 seq 8960), 0.91 (seq 10752), 1.00 / 1.01 (eagle3 gpt-oss-20b b4 seq 7936 /
    7424), 1.85 (seq 6400, 26 GiB under the device total without it);
    tests/data/gpu/validation/*rows*.jsonl, the OOM messages and reports. Hence two blocks. It
    does not always happen: 9 rows in that band ran. Expandable segments map pages
    instead of splitting segments: nothing stranded (sft seq 10752 ran and 12032 did not, as the
    floor alone predicts; gpt-oss-20b seq 7424 ran)."""
    return 0 if job.spec.expandable_segments else STRANDED_LARGEST_BLOCKS * largest_allocation
