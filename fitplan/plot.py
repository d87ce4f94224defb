"""`--plot FILE.png`: stacked components per phase, the device total as a line, the peak marked.

matplotlib is imported here only, and this module only when --plot is given.
"""

from __future__ import annotations

from pathlib import Path

from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate
from fitplan.report import GIB, component_names, verdict


def plot_estimate(est: Estimate, path: str | Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise FitplanError("--plot needs matplotlib: pip install 'fitplan[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(est.phases)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(phases) + 3), 5))
    bottoms = [0.0] * len(phases)
    for name in component_names(est):
        heights = [est.phases[p].get(name, 0) / GIB for p in phases]
        ax.bar(phases, heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    extras = (est.allocator_reserve_bytes + est.outside_allocator_bytes) / GIB
    ax.bar(phases, [extras] * len(phases), bottom=bottoms, label="reserve + outside allocator",
           color="lightgrey", hatch="//", edgecolor="grey")
    ax.axhline(est.gpu_total_bytes / GIB, color="red", linestyle="--", label="device total")
    peak = phases.index(est.peak_phase)
    ax.annotate("peak", (peak, est.peak_reserved_bytes / GIB), xytext=(0, 6), textcoords="offset points",
                ha="center", fontweight="bold")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(verdict(est), color="green" if est.fits else "red")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise FitplanError(f"--plot {path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)
