"""The fused head's per-chunk loss and gradient: torch.compile'd `_chunk_loss_grad` against the
Triton kernel (trainer/head_loss_kernel.py) at a few block sizes, on one CUDA GPU.

One chunk as the trainer forms it (2097 rows: a 32k draft vocab's chunk; 128256 for range),
teacher rows gathered out of order from a larger table, as bf16 logits and as fp32
probabilities. Each variant: median of CUDA-event timings after warm-up (compilation included
in the warm-up), GB/s counting one read of the logits and teacher rows and one write of the
gradient, and its distance from eager torch (fp32 arithmetic): max |grad diff| (scale 1), the
loss's relative difference, whether the agreements are equal. A variant that fails to compile
or run is reported in its row. The teacher's row statistics (`teacher_stats`, taken once per
micro-batch over its whole table) get a row of their own: there the grad column is the
log-sum-exp's largest difference from torch's, the agreements whether the argmaxes are equal.
Needs torch with CUDA and triton only.

    python benchmarks/head_loss_kernel.py --out head_loss_kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's trainer
    sys.path.insert(0, str(ROOT))

ROWS = 2097
VOCABS = (32000, 128256)
# (columns per block, warps per row)
CONFIGS = ((1024, 4), (2048, 4), (4096, 8), (2048, 8))
WARMUP = 3


def make_case(vocab: int, as_logits: bool, device):
    """(logits, teacher, p_rows, scale, stats): bf16 logits [ROWS, vocab]; a teacher table of
    ROWS + 256 rows (bf16 logits, or fp32 probabilities) of which shuffled rows are gathered;
    the teacher's row statistics (log-sum-exp, first argmax) for logits, made once per
    micro-batch by the trainer (teacher_stats, timed on its own row), None for probabilities."""
    from trainer.head_loss import teacher_stats

    import torch

    g = torch.Generator(device=device).manual_seed(vocab + as_logits)
    logits = (torch.randn(ROWS, vocab, device=device, generator=g) * 2).bfloat16()
    teacher = torch.randn(ROWS + 256, vocab, device=device, generator=g) * 2
    teacher = teacher.bfloat16() if as_logits else torch.softmax(teacher, -1)
    p_rows = torch.randperm(ROWS + 256, device=device, generator=g)[:ROWS]
    return logits, teacher, p_rows, torch.ones((), device=device), teacher_stats(teacher) if as_logits else None


def variants():
    """(name, function or the one-line reason it is unavailable)."""
    from trainer.head_loss import _chunk_loss_grad
    from trainer.lean_ops import compiled_on_cuda

    found = [("torch.compile", compiled_on_cuda("cuda", _chunk_loss_grad)[0])]
    try:
        from trainer.head_loss_kernel import chunk_loss_grad
    except ImportError as err:
        return found + [(f"triton {b}x{w}", f"triton does not import: {err}") for b, w in CONFIGS]
    for block, warps in CONFIGS:
        found.append((f"triton {block}x{warps}", _with_config(chunk_loss_grad, block, warps)))
    return found


def _with_config(kernel, block: int, warps: int):
    return lambda *case: kernel(*case, block=block, warps=warps)


def time_ms(fn, case, repeats: int) -> float:
    """Median milliseconds of one call, by CUDA events, after WARMUP calls. The calls are queued
    back to back, as in training, so host launch time between them does not idle the GPU."""
    import torch

    for _ in range(WARMUP):
        fn(*case)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn(*case)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure(name: str, fn, case, reference, repeats: int) -> dict:
    """One table row: timing and distance from `reference` (eager torch's outputs), or the error."""
    logits, teacher = case[0], case[1]
    row = {"variant": name, "vocab": logits.shape[1], "as_logits": case[4] is not None, "rows": logits.shape[0]}
    if isinstance(fn, str):
        return {**row, "error": fn}
    try:
        loss, agree, grad = fn(*case)
        ms = time_ms(fn, case, repeats)
    except Exception as err:  # a variant that does not compile or run is a result, not the end
        return {**row, "error": _one_line(err)}
    want_loss, want_agree, want_grad = reference
    moved = logits.numel() * (2 * logits.element_size() + teacher.element_size())
    return {**row, "ms": ms, "gb_per_s": moved / ms / 1e6,
            "max_grad_diff": float((grad.float() - want_grad.float()).abs().max()),
            "loss_rel_diff": float((loss - want_loss).abs() / want_loss.abs()),
            "agreements_equal": int(agree) == int(want_agree)}


def measure_stats(teacher, repeats: int) -> dict:
    """The teacher's row statistics (trainer/head_loss.py teacher_stats, once per micro-batch) over
    the whole table, against torch's logsumexp and argmax: a row of its own in the table."""
    import torch

    from trainer.head_loss import _torch_teacher_stats, teacher_stats

    lse, top = teacher_stats(teacher)
    want_lse, want_top = _torch_teacher_stats(teacher)
    ms = time_ms(teacher_stats, (teacher,), repeats)
    return {"variant": f"teacher_stats ({teacher.shape[0]} rows)", "vocab": teacher.shape[1], "as_logits": True,
            "rows": teacher.shape[0], "ms": ms, "gb_per_s": teacher.numel() * teacher.element_size() / ms / 1e6,
            "max_grad_diff": float((lse - want_lse).abs().max()), "loss_rel_diff": 0.0,
            "agreements_equal": bool(torch.equal(top.long(), want_top.long()))}


def _one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def markdown(rows: list[dict]) -> str:
    lines = ["| vocab | teacher | variant | ms | GB/s | max abs grad diff | loss rel diff | agreements equal |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        case = f"| {r['vocab']} | {'bf16 logits' if r['as_logits'] else 'fp32 probs'} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{case} failed: {r['error'].replace('|', '/')} | | | | |")
            continue
        agree = "yes" if r["agreements_equal"] else "NO"
        lines.append(f"{case} {r['ms']:.3f} | {r['gb_per_s']:.0f} | {r['max_grad_diff']:.2e} | "
                     f"{r['loss_rel_diff']:.1e} | {agree} |")
    return "\n".join(lines)


def kernel_bench_args(doc: str, name: str, argv) -> argparse.Namespace | None:
    """A kernel benchmark's --out and --repeats, or None (said on stderr) where torch sees no CUDA GPU."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median reported)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"{name} benchmark: needs a CUDA GPU; torch sees none", file=sys.stderr)
        return None
    return args


def main(argv=None) -> int:
    args = kernel_bench_args(__doc__, "head_loss_kernel", argv)
    if args is None:
        return 2
    import torch

    from trainer.head_loss import _chunk_loss_grad

    began = time.perf_counter()
    found = variants()
    rows = []
    for vocab in VOCABS:
        for as_logits in (True, False):
            case = make_case(vocab, as_logits, "cuda")
            reference = _chunk_loss_grad(*case)
            rows += [measure(name, fn, case, reference, args.repeats) for name, fn in found]
            if as_logits:
                rows.append(measure_stats(case[1], args.repeats))
            del case, reference
            torch.cuda.empty_cache()
    print(markdown(rows))
    seconds = time.perf_counter() - began
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_triton_version()}; {seconds:.0f} s")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _triton_version(),
                "rows": ROWS, "repeats": args.repeats, "scale": 1.0, "seconds": seconds}
        args.out.write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")
    return 0


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
