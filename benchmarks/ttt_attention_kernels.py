"""The draft's TTT attention over a whole unroll, kernel against kernel, on one GPU.

Times forward + backward of the 7 steps' attention as the draft runs them (step k's queries
over step 0's causal keys and steps 1..k's diagonal keys) for each way of computing it:

- `flex-ttt`: flex attention over the concatenated keys with the TTT block mask (the draft's
  `flex`; the concatenations made each step as the draft makes them);
- `split-flash`: trainer/ttt_attention.py, step 0's causal part on torch's FlashAttention-2;
- `split-cudnn`: the same split with cuDNN's fused attention for the causal part (the diagonal
  keys on trainer/ttt_diagonal_kernel.py's Triton kernels where triton imports);
- `split-cudnn-compiled`: the same with the diagonal keys on the torch.compile'd functions;
- `causal-cudnn`: each step's queries over step 0's causal keys alone on cuDNN's kernel, without
  the diagonal keys: not the draft's attention (its differences are not errors) but the floor the
  split's causal part sets, so that split-cudnn less this is the diagonal pass's cost.

It prints a table (ms per unroll, peak bytes above the inputs, max |difference| of the
output and of every gradient against the first variant given, and the first unroll's seconds,
compilation included) and writes the JSON to --out.

    python benchmarks/ttt_attention_kernels.py --out ttt_attention.json --seqs 2048,4096,8192,16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS, KV_HEADS, HEAD_DIM, TTT = 32, 8, 128, 7


def _inputs(seq: int, batch: int):
    import torch

    torch.manual_seed(0)

    def made(heads):  # [B, heads, S, d] viewed from [B, S, heads, d], as the projections give it
        return torch.randn(batch, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    qs = [made(HEADS).requires_grad_() for _ in range(TTT)]
    ks = [made(KV_HEADS).requires_grad_() for _ in range(TTT)]
    vs = [made(KV_HEADS).requires_grad_() for _ in range(TTT)]
    grads = [made(HEADS) for _ in range(TTT)]
    return qs, ks, vs, grads


def _unroll(variant: str, qs, ks, vs):
    import torch

    from trainer.draft import flex
    from trainer.ttt_attention import CudaCudnn, compiled_diagonal_kernels, ttt_attention

    outs = []
    for k in range(TTT):
        if variant == "flex-ttt":
            outs.append(flex(qs[k], torch.cat(ks[: k + 1], dim=2), torch.cat(vs[: k + 1], dim=2), qs[k].shape[2]))
        elif variant == "split-flash":
            outs.append(ttt_attention(qs[k], ks[: k + 1], vs[: k + 1]))
        elif variant == "split-cudnn":
            outs.append(ttt_attention(qs[k], ks[: k + 1], vs[: k + 1], kernel=CudaCudnn))
        elif variant == "split-cudnn-compiled":
            outs.append(ttt_attention(qs[k], ks[: k + 1], vs[: k + 1], kernel=CudaCudnn,
                                      diagonal=compiled_diagonal_kernels("cuda")))
        elif variant == "causal-cudnn":
            outs.append(ttt_attention(qs[k], ks[:1], vs[:1], kernel=CudaCudnn))
        else:
            raise ValueError(f"unknown variant {variant!r}: flex-ttt, split-flash, split-cudnn, "
                             "split-cudnn-compiled or causal-cudnn")
    return outs


def run_variant(variant: str, seq: int, batch: int, repeats: int) -> dict:
    import torch

    qs, ks, vs, grads = _inputs(seq, batch)
    leaves = [*qs, *ks, *vs]

    def once():
        outs = _unroll(variant, qs, ks, vs)
        torch.autograd.backward(outs, grads)
        return outs

    started = time.perf_counter()
    once()  # compiles
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    once()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        outs = once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - before
    return {"variant": variant, "seq": seq, "batch": batch, "ms": statistics.median(times), "ms_all": times,
            "first_s": round(first_s, 2),
            "peak_bytes": peak, "outs": [o.detach() for o in outs], "grads": [leaf.grad for leaf in leaves]}


def _max_diff(a: list, b: list) -> float:
    """Over the tensors both have (causal-cudnn leaves the diagonal keys without gradients)."""
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x is not None and y is not None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="flex-ttt,split-flash,split-cudnn")
    args = parser.parse_args(argv)
    import torch

    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        reference = None
        for variant in args.variants.split(","):
            started = time.time()
            try:
                result = run_variant(variant, seq, args.batch, args.repeats)
            except Exception as error:  # noqa: BLE001 - a kernel that will not run is a row of the table
                rows.append({"variant": variant, "seq": seq, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"{variant} seq {seq}: {rows[-1]['error']}", flush=True)
                continue
            outs, grads = result.pop("outs"), result.pop("grads")
            if reference is None:
                reference = (outs, grads)
            result["out_diff"] = _max_diff(outs, reference[0])
            result["grad_diff"] = _max_diff(grads, reference[1])
            result["wall_s"] = round(time.time() - started, 1)
            rows.append(result)
            print(f"{variant} seq {seq}: {result['ms']:.2f} ms, peak {result['peak_bytes'] / 2**30:.2f} GiB, "
                  f"out diff {result['out_diff']:.3g}, grad diff {result['grad_diff']:.3g}, "
                  f"first unroll {result['first_s']:.1f} s", flush=True)
        reference = outs = grads = None
        torch.cuda.empty_cache()
    print("\n| seq | variant | ms per unroll (fwd+bwd) | peak GiB above inputs | max out diff | max grad diff "
          "| first unroll s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['seq']} | {r['variant']} | {r['error'][:80]} | | | | |")
        else:
            print(f"| {r['seq']} | {r['variant']} | {r['ms']:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
                  f"{r['out_diff']:.3g} | {r['grad_diff']:.3g} | {r['first_s']:.1f} |")
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "heads": HEADS, "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "ttt": TTT, "argv": sys.argv[1:]}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
