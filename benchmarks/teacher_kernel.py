"""The teacher made from the target's logits: trainer/loss.py `make_teacher`'s torch path (the
draft columns gathered, an argmax over the whole vocab, a pass of the row statistics' kernel)
against its one-pass Triton kernel (trainer/teacher_kernel.py, then the table's row statistics)
at a few settings (columns per block / warps), on one CUDA GPU.

Logits [1, S, V] bf16 as the target's lm_head makes them (S 16384 by default; V of Llama-3.1,
Qwen3 and gpt-oss), a 32000-word draft vocab drawn at random and sorted, as trainer/vocab.py
makes it. Each variant: median of CUDA-event timings after warm-up, GB/s counting one read of
the logits and one write of the table, and whether its table, counted positions, row
log-sum-exp (largest difference) and argmax equal the torch path's.

    python benchmarks/teacher_kernel.py --out teacher_kernel.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's trainer
    sys.path.insert(0, str(ROOT))

from benchmarks.head_loss_kernel import time_ms  # noqa: E402

VOCABS = (128256, 151936, 201088)
DRAFT_VOCAB = 32000
TTT = 7
CONFIGS = ((1024, 4), (512, 4), (1024, 8), (2048, 8))  # (columns per block, warps)


def make_case(seq: int, vocab: int, device):
    """(logits [1, seq, vocab] bf16, loss mask, sorted draft ids, t2d)."""
    import torch

    g = torch.Generator(device=device).manual_seed(vocab)
    logits = (torch.randn(1, seq, vocab, device=device, generator=g) * 2).bfloat16()
    draft_ids = torch.randperm(vocab, device=device, generator=g)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool, device=device)
    t2d[draft_ids] = True
    return logits, torch.ones(1, seq, dtype=torch.bool, device=device), draft_ids, t2d


def torch_path(logits, mask, draft_ids, t2d):
    """make_teacher with the kernel module unavailable, as without triton."""
    from trainer import loss

    kernel_module = loss.triton_module
    loss.triton_module = lambda name: None
    try:
        return loss.make_teacher(logits, mask, draft_ids, t2d, TTT)
    finally:
        loss.triton_module = kernel_module


def kernel_path(block: int, warps: int):
    """make_teacher's CUDA path at one setting of the kernel: its table, then the table's row
    statistics (Teacher's, head_loss_kernel's teacher_stats)."""
    from trainer import loss, teacher_kernel

    def make(logits, mask, draft_ids, t2d):
        table, target_top = teacher_kernel.teacher_from_logits(logits, draft_ids, TTT, block, warps)
        return loss.Teacher(table, loss._counted(mask, t2d, target_top, TTT), True)

    return make


def compare(made, want) -> dict:
    return {"table_equal": bool((made.table == want.table).all()),
            "valid_equal": bool((made.valid == want.valid).all()),
            "top_equal": bool((made.top == want.top).all()),
            "lse_max_diff": float((made.lse - want.lse).abs().max())}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def _vocabs(text: str) -> tuple[int, ...]:
    """--vocabs: positive whole numbers, each above the draft vocab, comma-separated."""
    try:
        vocabs = tuple(int(v) for v in text.split(","))
    except ValueError:
        vocabs = ()
    if not vocabs or min(vocabs) <= DRAFT_VOCAB:
        raise argparse.ArgumentTypeError(f"{text!r}: give target vocab sizes above {DRAFT_VOCAB}, comma-separated")
    return vocabs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=_positive, default=16384, help="positions (default 16384)")
    parser.add_argument("--vocabs", type=_vocabs, default=VOCABS, help="target vocab sizes, comma-separated "
                        f"(default {','.join(map(str, VOCABS))})")
    parser.add_argument("--repeats", type=_positive, default=10, help="timed runs per variant (default 10)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/teacher_kernel.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    started, results = time.perf_counter(), []
    print(f"{'vocab':>7} {'variant':>18} {'ms':>8} {'GB/s':>7}  same as torch")
    for vocab in args.vocabs:
        case = make_case(args.seq, vocab, device)
        moved = case[0].numel() * case[0].element_size() + args.seq * DRAFT_VOCAB * case[0].element_size()
        want = torch_path(*case)
        variants = [("torch", torch_path)] + [(f"kernel {b}/{w}", kernel_path(b, w)) for b, w in CONFIGS]
        for name, fn in variants:
            ms = time_ms(fn, case, args.repeats)
            same = compare(fn(*case), want)
            results.append({"vocab": vocab, "variant": name, "ms": ms, "gb_per_s": moved / ms / 1e6, **same})
            print(f"{vocab:>7} {name:>18} {ms:8.3f} {moved / ms / 1e6:7.0f}  {same}")
        del case, want
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq,
            "draft_vocab": DRAFT_VOCAB, "repeats": args.repeats, "seconds": time.perf_counter() - started}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
