"""How far a 0.7x-SpecForge step time is from what the same arithmetic costs on the GPU.

Reads a `benchmarks/vs_specforge.py --profile` result (its `kernels`: the CUDA kernels of one
profiled step per tool, costliest first; the 40 costliest in results written before) and prints,
per shape: SpecForge's step and 0.7x of it; the step's model FLOPs and the MFU that 0.7x would mean; each tool's GEMM time (cuBLAS `nvjet`
kernels) and flex attention time (forward + backward kernels); and what 0.7x leaves for every
other kernel (norms, softmax and loss, elementwise, optimizer) once the faster tool's GEMMs and
attention have run.

    python benchmarks/time_floor.py docs/data/vs_specforge.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL = 0.7


def kernel_ms(result: dict, *needles: str) -> float:
    return sum(k["ms"] for k in result.get("kernels") or [] if any(n in k["name"] for n in needles))


def pairs(results: list[dict]) -> list[tuple[dict, dict]]:
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        if r.get("ok") and r.get("kernels"):
            by_shape.setdefault((r["batch"], r["seq"]), {})[r["tool"]] = r
    out = []
    for _, tools in sorted(by_shape.items()):
        # SpecForge unwrapped, or wrapped in FSDP as its trainer runs it
        reference = tools.get("specforge") or tools.get("specforge-fsdp")
        if "fitplan" in tools and reference is not None:
            out.append((tools["fitplan"], reference))
    return out


def row(fitplan: dict, specforge: dict) -> str:
    budget_ms = GOAL * specforge["step_s"] * 1000
    mfu = fitplan["flops"] / (budget_ms / 1000) / (fitplan["peak_tflops"] * 1e12)
    gemm = {name: kernel_ms(r, "nvjet", "gemm") for name, r in (("f", fitplan), ("s", specforge))}
    flex = {name: kernel_ms(r, "flex_attention") for name, r in (("f", fitplan), ("s", specforge))}
    left = budget_ms - min(gemm.values()) - min(flex.values())
    return (f"| {fitplan['batch']} x {fitplan['seq']} | {specforge['step_s'] * 1000:.1f} | {budget_ms:.1f} | "
            f"{fitplan['step_s'] * 1000:.1f} | {100 * mfu:.0f}% | {gemm['f']:.1f} / {gemm['s']:.1f} | "
            f"{flex['f']:.1f} / {flex['s']:.1f} | {left:.1f} |")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/time_floor.py VS_SPECFORGE_JSON (a --profile run)", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"{path}: not a vs_specforge.py result ({exc})", file=sys.stderr)
        return 2
    found = pairs(results)
    if not found:
        print(f"{path}: no shape with both tools profiled (run vs_specforge.py with --profile)", file=sys.stderr)
        return 2
    print("| B x S | SpecForge step ms | 0.7x ms | fitplan step ms | MFU at 0.7x | GEMM ms fitplan / SpecForge "
          "| flex ms fitplan / SpecForge | ms left at 0.7x for all else |")
    print("|---|---|---|---|---|---|---|---|")
    for fitplan, specforge in found:
        print(row(fitplan, specforge))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
