"""fitplan explain on failures that look like a GPU OOM and are not one.

Triton's shared-memory limit, an asynchronous CUDA kernel fault and a host-memory kill each get
their own explanation and fix, never "out of memory" for the GPU; the first failure in log order
is the one explained, the others named in one line; CUDA OOM logs read exactly as before.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.errors import FitplanError
from fitplan.explain import parse_failures, parse_ooms

# torch.compile of the eagle3 draft's flex_attention on an H100: the forward template does not fit.
FLEX_SHARED_MEMORY = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/workspace/trainer/train.py", line 301, in <module>
[rank0]:     loss = draft_step(batch)
[rank0]:   File "/usr/local/lib/python3.11/site-packages/torch/nn/attention/flex_attention.py", line 1312, in flex_attention
[rank0]:     out, lse = torch.compile(_flex_attention_hop_wrapper, backend="inductor", fullgraph=True)(
[rank0]:   File "/usr/local/lib/python3.11/site-packages/torch/_inductor/runtime/triton_heuristics.py", line 420, in precompile
[rank0]:     compiled_binary, launcher = self._precompile_config(c, warm_cache_only)
[rank0]: torch._inductor.exc.InductorError: OutOfResources: out of resource: shared memory, Required: 262144, Hardware limit: 232448. Reducing block sizes or `num_stages` may help.
"""
# Liger's fused linear cross-entropy on an L4 (99 KiB per block).
LIGER_SHARED_MEMORY = """\
Traceback (most recent call last):
  File "/home/user/sft.py", line 88, in <module>
    loss = criterion(lm_head.weight, hidden, labels)
  File "/usr/lib/python3.10/site-packages/liger_kernel/ops/fused_linear_cross_entropy.py", line 112, in fused_linear_cross_entropy_forward
    liger_cross_entropy_kernel[(n_rows,)](
  File "/usr/lib/python3.10/site-packages/triton/runtime/jit.py", line 345, in <lambda>
triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 131072, Hardware limit: 101376. Reducing block sizes or `num_stages` may help.
"""
# The error seen alone (a log cut to its last lines).
BARE_SHARED_MEMORY = ("triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 196608, "
                      "Hardware limit: 166912. Reducing block sizes or `num_stages` may help.\n")

ILLEGAL_ACCESS = """\
step 41 | loss 2.318 | lr 9.8e-05
[rank2]: Traceback (most recent call last):
[rank2]:   File "/workspace/trainer/train.py", line 301, in <module>
[rank2]:     main()
[rank2]:   File "/workspace/trainer/train.py", line 274, in train_step
[rank2]:     torch.cuda.synchronize()
[rank2]:   File "/usr/local/lib/python3.11/site-packages/torch/cuda/__init__.py", line 985, in synchronize
[rank2]:     return torch._C._cuda_synchronize()
[rank2]: RuntimeError: CUDA error: an illegal memory access was encountered
[rank2]: CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
[rank2]: For debugging consider passing CUDA_LAUNCH_BLOCKING=1
[rank2]: Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""
LAUNCH_FAILURE = """\
  File "/workspace/specforge/core/eagle3.py", line 210, in forward
    acc = (logits.argmax(-1) == target).float().mean().item()
RuntimeError: CUDA error: unspecified launch failure
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
"""

# An embedding lookup with a token id past the vocab: the device assert, reported at .item().
DEVICE_ASSERT = """\
../aten/src/ATen/native/cuda/Indexing.cu:1289: indexSelectLargeIndex: block: [212,0,0], thread: [64,0,0] Assertion `srcIndex < srcSelectDimSize` failed.
Traceback (most recent call last):
  File "/workspace/trainer/train.py", line 280, in train_step
    total += loss.item()
RuntimeError: CUDA error: device-side assert triggered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
"""

# torchrun's summary after the kernel's OOM killer took rank 0 (host RAM), with the dmesg line pasted in.
TORCHRUN_SIGKILL = """\
Loading checkpoint shards: 100%|##########| 30/30 [02:11<00:00,  4.38s/it]
[Tue Mar  4 10:12:55 2025] Out of memory: Killed process 48213 (python) total-vm:412331456kB, anon-rss:251658240kB
W0304 10:12:56.120000 140213 torch/distributed/elastic/multiprocessing/api.py:897] Sending process 48214 closing signal SIGTERM
E0304 10:12:57.330000 140213 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: -9) local_rank: 0 (pid: 48213) of binary: /usr/bin/python
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train_eagle3.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-03-04_10:12:57
  host      : gpu-node-7
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 48213)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 48213
============================================================
"""
# A Kubernetes pod's last state and the shell's report, with no kernel line.
CONTAINER_KILL = """\
    Last State:     Terminated
      Reason:       OOMKilled
      Exit Code:    137
"""
SHELL_KILL = "/var/spool/slurmd/job4412/slurm_script: line 14: 90211 Killed                  python train.py --config job.yaml\n"

# A CUDA OOM of the existing kind (torch >= 2.1 format).
CUDA_OOM = """\
[rank3]: Traceback (most recent call last):
[rank3]:   File "scripts/train_eagle3.py", line 512, in <module>
[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 73.63 GiB. GPU 3 has a total capacity
of 79.18 GiB of which 4.12 GiB is free. Including non-PyTorch memory, this process has 75.05 GiB memory in use.
Of the allocated memory 60.02 GiB is allocated by PyTorch, and 14.20 GiB is reserved by PyTorch but unallocated.
"""
CUDA_OOM_2 = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
    "79.18 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
    "Of the allocated memory 69.40 GiB is allocated by PyTorch, and 7.95 GiB is reserved by PyTorch but unallocated.\n"
)

LOOKALIKES = {
    "flex": FLEX_SHARED_MEMORY,
    "liger": LIGER_SHARED_MEMORY,
    "bare-shared": BARE_SHARED_MEMORY,
    "illegal": ILLEGAL_ACCESS,
    "launch": LAUNCH_FAILURE,
    "assert": DEVICE_ASSERT,
    "torchrun": TORCHRUN_SIGKILL,
    "container": CONTAINER_KILL,
    "shell": SHELL_KILL,
}


def explain(text: str, *args: str):
    result = CliRunner().invoke(app, ["explain", "-", *args], input=text)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def flat(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_a_lookalike_is_explained_and_never_called_a_gpu_oom(name):
    result = explain(LOOKALIKES[name])
    out = flat(result.output)
    assert result.exit_code == 0, result.output
    assert "out of memory" not in out.lower() and "Tried to allocate" not in out
    assert "Cause:" not in out  # none of the OOM causes (fragmentation, large request, ...)
    assert "Fix:" in out


def test_shared_memory_states_the_sizes_and_the_flex_fix():
    out = flat(explain(FLEX_SHARED_MEMORY).output)
    assert "Not GPU memory" in out
    # 262144 B = 256.0 KiB required; 232448 B = 227.0 KiB, the H100/H200 per-block limit.
    assert "required 256.0 KiB, hardware limit 227.0 KiB (over by 29.0 KiB)" in out
    assert "H100/H200" in out
    assert "flex attention's compiled kernel" in out
    assert "BLOCK_M" in out and "num_stages" in out and "--attention sdpa" in out


def test_shared_memory_names_liger_from_its_traceback():
    out = flat(explain(LIGER_SHARED_MEMORY).output)
    # 131072 B = 128.0 KiB required against 101376 B = 99.0 KiB (L4 class).
    assert "required 128.0 KiB, hardware limit 99.0 KiB" in out and "L4" in out
    assert "a Liger Triton kernel" in out and "flex attention's compiled kernel" not in out
    assert "Liger kernel off" in out


def test_shared_memory_without_a_traceback_names_the_usual_kernels():
    out = flat(explain(BARE_SHARED_MEMORY).output)
    assert "required 192.0 KiB, hardware limit 163.0 KiB" in out and "A100" in out
    assert "usually flex attention's compiled kernel" in out and "Liger/fused-loss" in out


def test_shared_memory_with_the_job_names_its_flex_attention():
    eagle3 = flat(explain(FLEX_SHARED_MEMORY, "--model", "llama-3.1-8b", "--seq", "2048").output)
    assert "This job's draft attention is flex (--attention flex, the eagle3 default)" in eagle3
    assert "Predicted for this job" not in eagle3  # no GPU-memory component is matched
    sdpa = flat(explain(FLEX_SHARED_MEMORY, "--model", "llama-3.1-8b", "--attention", "sdpa").output)
    assert "draft attention is sdpa, not flex" in sdpa
    # from seq 4096 on fitplan's trainer runs the split attention by default
    split = flat(explain(FLEX_SHARED_MEMORY, "--model", "llama-3.1-8b", "--seq", "4096").output)
    assert "draft attention is split, not flex" in split


def test_kernel_fault_says_where_it_surfaced_and_how_to_find_it():
    result = explain(ILLEGAL_ACCESS)
    out = flat(result.output)
    assert "Not an allocation failure" in out and "illegal memory access" in out
    # the last frame before the message: the synchronize() call, where it surfaced
    assert 'File "/usr/local/lib/python3.11/site-packages/torch/cuda/__init__.py", line 985, in synchronize' in out
    assert "not where it happened" in out
    assert "CUDA_LAUNCH_BLOCKING=1" in out and "vocab size" in out
    assert "more memory (or a smaller batch) will not fix it" in out
    launch = flat(explain(LAUNCH_FAILURE).output)
    assert "unspecified launch failure" in launch and "line 210, in forward" in launch and ".item()" in launch
    device_assert = flat(explain(DEVICE_ASSERT).output)
    assert "a device-side assert" in device_assert and "line 280, in train_step: total += loss.item()" in device_assert


def test_kernel_fault_and_host_kill_with_the_job_match_no_component():
    for log in (ILLEGAL_ACCESS, TORCHRUN_SIGKILL):
        result = explain(log, "--model", "llama-3.1-8b")
        out = flat(result.output)
        assert result.exit_code == 0, result.output
        assert "GPU memory estimate does not bear on this" in out
        assert "best matches" not in out and "Cheapest fix" not in out


def test_host_kill_names_the_evidence_and_the_fix():
    out = flat(explain(TORCHRUN_SIGKILL).output)
    assert "Not the GPU: host (CPU) memory" in out
    assert "the kernel's OOM killer ended process 48213 (python)" in out and "exitcode -9" in out
    assert "device_map" in out and "meta device" in out and "num_workers" in out and "memory limit" in out
    assert "time limit" not in out  # the OOM killer is in the log: no doubt to raise
    assert "First failure" not in out  # the kill's four lines are its evidence, one failure
    container = flat(explain(CONTAINER_KILL).output)
    assert "OOMKilled" in container and "exit status 137" in container
    shell = flat(explain(SHELL_KILL).output)
    assert "the shell's 'Killed'" in shell and "time limit" in shell  # a bare SIGKILL: say how to confirm


def test_the_first_failure_is_explained_and_the_others_named():
    # host kill first, CUDA OOM after: the kill is explained, the OOM named in one line
    result = explain(SHELL_KILL + CUDA_OOM)
    out = flat(result.output)
    lines = result.output.splitlines()
    assert lines[0] == "First failure in the log: a host-memory kill; also in it: 1 CUDA out-of-memory message."
    assert "Not the GPU" in out and "Tried to allocate" not in out and "Cause:" not in out
    # the OOM first: its explanation as ever, the kill named
    result = explain(CUDA_OOM + ILLEGAL_ACCESS + LIGER_SHARED_MEMORY)
    first = result.output.splitlines()[0]
    assert first == ("First failure in the log: a CUDA out-of-memory message; also in it: "
                     "1 asynchronous CUDA kernel error, 1 Triton shared-memory limit message.")
    assert "Cause: one large allocation" in flat(result.output)
    # several ranks printing the same Triton error: one line counts the rest
    two = explain(FLEX_SHARED_MEMORY + BARE_SHARED_MEMORY).output.splitlines()[0]
    assert two == "First failure in the log: Triton's shared-memory limit; also in it: 1 more Triton shared-memory limit message."


def test_order_is_by_position_in_the_log():
    kinds = [f.kind for f in parse_failures(ILLEGAL_ACCESS + CUDA_OOM_2 + CONTAINER_KILL)]
    assert kinds[0] == "kernel-fault" and kinds.index("cuda-oom") < kinds.index("host-kill")


def test_a_gpu_oom_line_without_numbers_is_named_not_decoded():
    result = explain("RuntimeError: CUDA error: out of memory\n" + LAUNCH_FAILURE)
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == ("First failure in the log: an asynchronous CUDA kernel error; also in it: "
                                             "1 out-of-memory line without PyTorch's numbers (before it).")


@pytest.mark.parametrize("log", [CUDA_OOM, CUDA_OOM_2, CUDA_OOM + CUDA_OOM_2])
def test_cuda_oom_logs_are_unaffected(log):
    out = explain(log).output
    assert explain(log).exit_code == 0
    assert "Not GPU memory" not in out and "First failure" not in out
    assert [f.detail for f in parse_failures(log)] == parse_ooms(log)
    if log == CUDA_OOM + CUDA_OOM_2:
        assert out.splitlines()[0] == "2 OOM messages in the log; explaining the first."


@pytest.mark.parametrize("text,words", [
    (BARE_SHARED_MEMORY.replace("196608", "100000"), "impossible numbers (Required 100000 within the Hardware limit 166912)"),
    (BARE_SHARED_MEMORY.replace("166912", "0"), "a hardware limit of 0"),
    (BARE_SHARED_MEMORY.replace("196608", "9" * 5000), "a size beyond 1 GiB"),
])
def test_an_edited_triton_message_is_one_line(text, words):
    with pytest.raises(FitplanError, match="impossible numbers"):
        parse_failures(text)
    result = explain(text)
    assert result.exit_code == 2 and words in result.output and len(result.output.strip().splitlines()) == 1


def test_log_text_is_not_rich_markup():
    # a frame whose path holds rich markup is printed as written
    log = ILLEGAL_ACCESS.replace("/workspace/trainer/train.py", "/w/[bold red]x[/]/train.py").replace(
        "torch/cuda/__init__.py", "[link=http://x]torch[/link]/cuda.py")
    result = explain(log)
    assert result.exit_code == 0, result.output
    assert 'File "/usr/local/lib/python3.11/site-packages/[link=http://x]torch[/link]/cuda.py"' in flat(result.output)


def test_a_log_with_nothing_known_is_still_refused():
    result = explain("step 1 | loss 2.1\nstep 2 | loss 2.0\n")
    assert result.exit_code == 2 and "no CUDA out-of-memory message" in result.output
