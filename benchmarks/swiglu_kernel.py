"""SwiGLU's elementwise passes in the lean MLP's backward, on one CUDA GPU: the Triton kernel
(trainer/swiglu_kernel.py) at a few block sizes against torch.compile of the same function
(trainer/lean_ops.py `_swiglu_backward`) and against the two compiled functions the trainer ran
before (the product, then the gradients from gate and up read again).

[tokens, I] bf16 at I 14336 (Llama-3.1-8B's draft) and 4096 / 16384 tokens. Each variant: median
of CUDA-event timings after warm-up (compilation in the warm-up), GB/s over the bytes it must move
(six [tokens, I] passes in one pass, eight in two), and its largest difference from eager torch's
fp32 formulas in units of the largest output. The forward product too. Needs torch with CUDA and
triton only.

    python benchmarks/swiglu_kernel.py --out swiglu_kernel.json
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's trainer and benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.head_loss_kernel import kernel_bench_args, time_ms  # noqa: E402

INNER = 14336
TOKENS = (4096, 16384)
# (elements per program, warps)
CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (8192, 8))


def _input_grads(grad, gate, up):
    """(d gate, d up) from gate and up read again: the second of the trainer's earlier two passes."""
    import torch
    import torch.nn.functional as F

    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _two_compiled_passes():
    """The trainer's earlier backward: the product and the input gradients, each compiled on its
    own (two kernels, eight passes); compiled as one function torch fuses them into one."""
    import torch

    from trainer.lean_ops import _swiglu

    product, grads = torch.compile(_swiglu, dynamic=True), torch.compile(_input_grads, dynamic=True)
    return lambda grad, gate, up: (product(gate, up), *grads(grad, gate, up))


def backward_variants():
    """(name, passes over [tokens, I], function(grad, gate, up) -> (product, d gate, d up))."""
    import torch

    from trainer import swiglu_kernel
    from trainer.lean_ops import _swiglu_backward

    found = [("torch.compile, two functions (before)", 8, _two_compiled_passes()),
             ("torch.compile, one function", 6, torch.compile(_swiglu_backward, dynamic=True))]
    return found + [(f"triton {b}x{w}", 6, functools.partial(swiglu_kernel.swiglu_backward, block=b, warps=w))
                    for b, w in CONFIGS]


def forward_variants():
    import torch

    from trainer import swiglu_kernel
    from trainer.lean_ops import _swiglu

    return [("torch.compile", 3, torch.compile(_swiglu, dynamic=True))] + [
        (f"triton {b}x{w}", 3, functools.partial(swiglu_kernel.swiglu, block=b, warps=w)) for b, w in CONFIGS]


def reference(grad, gate, up):
    """Eager torch's fp32 formulas: (product, d gate, d up)."""
    import torch

    d, g, u = grad.float(), gate.float(), up.float()
    s = torch.sigmoid(g)
    silu = g * s
    return silu * u, d * u * s * (1 + g * (1 - s)), d * silu


def measure(name, passes, fn, case, want, repeats) -> dict:
    """One row: timing, GB/s and the largest difference from `want` over the outputs."""
    tokens = case[-1].shape[0]
    row = {"variant": name, "tokens": tokens, "inner": INNER}
    try:
        # the backward writes d gate over its first argument: the checked call gets a copy, the
        # timed calls a scratch copy of their own (what it holds by then does not change the time)
        got = fn(case[0].clone(), *case[1:])
        ms = time_ms(fn, (case[0].clone(), *case[1:]), repeats)
    except Exception as err:  # a variant that does not compile or run is a result
        return {**row, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}
    got = got if isinstance(got, tuple) else (got,)
    diff = max(float((g.float() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))
    return {**row, "ms": ms, "gb_per_s": passes * case[-1].numel() * 2 / ms / 1e6, "max_rel_diff": diff}


def markdown(rows: list[dict]) -> str:
    lines = ["| pass | tokens | variant | ms | GB/s | max diff / max |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        head = f"| {r['pass']} | {r['tokens']} | {r['variant']} |"
        lines.append(f"{head} failed: {r['error']} | | |" if "error" in r else
                     f"{head} {r['ms']:.3f} | {r['gb_per_s']:.0f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = kernel_bench_args(__doc__, "swiglu_kernel", argv)
    if args is None:
        return 2
    import torch

    began, rows = time.perf_counter(), []
    for tokens in TOKENS:
        g = torch.Generator(device="cuda").manual_seed(tokens)
        grad, gate, up = ((torch.randn(tokens, INNER, device="cuda", generator=g) * 2).bfloat16() for _ in range(3))
        want = reference(grad, gate, up)
        for name, passes, fn in forward_variants():
            rows.append({"pass": "forward", **measure(name, passes, fn, (gate, up), want[:1], args.repeats)})
        for name, passes, fn in backward_variants():
            rows.append({"pass": "backward", **measure(name, passes, fn, (grad, gate, up), want, args.repeats)})
    print(markdown(rows))
    print(f"\n{time.perf_counter() - began:.0f} s; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
