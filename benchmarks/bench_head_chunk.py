"""The fused head + loss (trainer/head_loss.py) at several chunk sizes: time per TTT step and the
memory a step adds, on one CUDA GPU.

A chunk of positions is the unit of the head's work: its logits GEMM [rows, h] x [h, Vd], the loss
kernel, the head weight's gradient (an accumulating GEMM whose reduction runs over the chunk's
rows) and the hidden's gradient. Small chunks bound the transient logits; large ones give the
weight-gradient GEMM a longer reduction for each time it reads and writes the [Vd, h] sum. This
runs one TTT step's head as the trainer does (gradients made in forward into the unroll's summed
buffer, the final norm inside) over B x S counted rows, for each chunk size.

    python benchmarks/bench_head_chunk.py --seq 16384 --rows 1024,2048,2097,4096,8192
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

WARMUP = 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384, help="positions of the step (batch 1)")
    p.add_argument("--hidden", type=int, default=4096, help="draft hidden size")
    p.add_argument("--vocab", type=int, default=32000, help="draft vocab")
    p.add_argument("--rows", default="1024,2048,2097,3072,4096,8192",
                   help="chunk sizes in rows, comma-separated (8192: the trainer's at a 32k vocab, "
                        "512 MiB of bf16 logits; 2097: its earlier size, 256 MiB of fp32 ones)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per chunk size (median reported)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    return p


def make_case(seq: int, hidden: int, vocab: int, ttt: int = 1):
    """(head, norm, hidden states, teacher, counted rows) of one step, every position counted."""
    import torch

    from trainer.draft import RMSNorm
    from trainer.head_loss import CountedRows, DraftHead
    from trainer.loss import Teacher

    g = torch.Generator(device="cuda").manual_seed(0)
    head = DraftHead(hidden, vocab).cuda().bfloat16()
    norm = RMSNorm(hidden, 1e-5).cuda().bfloat16()
    x = torch.randn(1, seq, hidden, device="cuda", generator=g).bfloat16()
    teacher = (torch.randn(1, seq + ttt, vocab, device="cuda", generator=g) * 2).bfloat16()
    valid = torch.ones(1, seq + ttt, dtype=torch.bool, device="cuda")
    valid[:, seq - 1 :] = False
    return head, norm, x, Teacher(teacher, valid, True), CountedRows(valid)


def one_step(case):
    """The head's loss with its gradients made in forward (trainer/loss.py unroll_loss's lean path)."""
    from trainer.step_grads import StepGrads

    head, norm, x, teacher, counted = case
    grads = StepGrads(1)
    loss, _ = head(x, norm, teacher, counted, 1, grads, 1.0)
    return loss, grads


def measure(case, rows: int, vocab: int, repeats: int) -> dict:
    import torch

    from fitplan.estimator import draft_terms
    from trainer import head_loss

    # chunk_rows(vocab, grad_in_forward=True) == rows: the bf16 logits of `rows` positions, unrounded
    draft_terms.HEAD_FORWARD_GRAD_CHUNK_BYTES, draft_terms.HEAD_ROW_MULTIPLE = rows * 2 * vocab, 1
    assert head_loss.chunk_rows(vocab, grad_in_forward=True) == rows
    for _ in range(WARMUP):
        loss, _ = one_step(case)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, grads = one_step(case)
        end.record()
        del grads
        times.append((start, end))
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in times)
    _, _, x, _, _ = case
    tokens, hidden = x.shape[1] - 1, x.shape[2]
    flops = 3 * 2 * tokens * hidden * vocab  # logits, hidden's gradient, weight's gradient
    return {"rows": rows, "ms": ms, "tflops": flops / ms / 1e9, "loss": float(loss.detach()),
            "peak_over_base_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def markdown(results: list[dict]) -> str:
    lines = ["| chunk rows | ms per step | TFLOP/s (3 GEMMs) | peak over base MiB | loss |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['rows']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['peak_over_base_mib']:.0f} | "
                     f"{r['loss']:.6g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        sizes = [int(r) for r in args.rows.split(",")]
    except ValueError:
        print(f"bench_head_chunk: --rows takes whole numbers separated by commas, not {args.rows!r}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1:
        print("bench_head_chunk: --rows takes positive chunk sizes", file=sys.stderr)
        return 2
    if args.seq < 2 or args.hidden < 1 or args.vocab < 1 or args.repeats < 1:
        print("bench_head_chunk: accepted --seq 2 or more, --hidden, --vocab and --repeats 1 or more", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench_head_chunk: needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    began = time.perf_counter()
    case = make_case(args.seq, args.hidden, args.vocab)
    results = [measure(case, rows, args.vocab, args.repeats) for rows in sizes]
    print(markdown(results))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq,
            "hidden": args.hidden, "vocab": args.vocab, "repeats": args.repeats,
            "seconds": time.perf_counter() - began}
    print(f"\n{meta['device']}, torch {meta['torch']}; B1 S{args.seq}, h {args.hidden}, Vd {args.vocab}; "
          f"{meta['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
