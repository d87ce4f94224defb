"""Runtime constants: memory the training math does not explain. All calibration lives here.

Sources: profiles/gpus.json `runtime_overheads` (measured with torch 2.11.0+cu130, CUDA 13.0,
driver 580.159.04, NCCL 2.28.9, NVLink multicast off) and the literature cited there.
"""

from __future__ import annotations

from fitplan.layout import Job

MIB = 1 << 20
GIB = 1 << 30

# --- outside the allocator -----------------------------------------------------------------
# CUDA context with lazy module loading: 554,500,096 B measured on H100 80GB HBM3 (528.8 MiB),
# 554,565,632 B on H200 (gpus.json runtime_overheads.cuda_context.measured_here).
CUDA_CONTEXT_BYTES = 554_500_096
# First bf16 GEMM loads kernels outside the allocator: +68 MiB; first SDPA: +8 MiB (same source).
FIRST_KERNELS_BYTES = (68 + 8) * MIB
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
# Provisional, to be calibrated from GPU measurements (docs/validation.md): the caching
# allocator rounds blocks up (2 MiB segments for large allocations) and fragments with varying
# shapes; published planners that compare with allocated memory miss 8-33% (memory-anatomy §6).
# We start with 5% of the peak allocated bytes plus 256 MiB of rounding, and 2% + 64 MiB with
# expandable_segments (which maps pages instead of caching whole segments).
RESERVE_FRACTION = 0.05
RESERVE_ROUNDING_BYTES = 256 * MIB
EXPANDABLE_RESERVE_FRACTION = 0.02
EXPANDABLE_ROUNDING_BYTES = 64 * MIB


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


def outside_allocator_bytes(job: Job) -> int:
    total = CUDA_CONTEXT_BYTES + FIRST_KERNELS_BYTES
    comms = communicators(job)
    if comms:
        total += NCCL_FIRST_COLLECTIVE_BYTES + (comms - 1) * NCCL_EXTRA_COMMUNICATOR_BYTES
        total += KERNELS_AFTER_NCCL_BYTES
    if uses_all_to_all(job):
        total += all_to_all_bytes(job.tp)
    return total


def allocator_reserve_bytes(job: Job, peak_allocated: int) -> int:
    if job.spec.expandable_segments:
        return int(EXPANDABLE_RESERVE_FRACTION * peak_allocated) + EXPANDABLE_ROUNDING_BYTES
    return int(RESERVE_FRACTION * peak_allocated) + RESERVE_ROUNDING_BYTES
