"""`--plot FILE.png`: stacked components per phase, the device total as a line, the peak marked.

The image names the job it is for (model, GPUs, layout, batch; the workload, seq and runtime too
when the caller passes the RunSpec) and gives every component its own colour. matplotlib is
imported here only, and this module only when --plot is given.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate
from fitplan.render.estimate import GIB, component_names, gib, verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fitplan.config import RunSpec

DPI = 120
RESERVE_LABEL = "reserve + outside allocator"


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FitplanError("--plot needs matplotlib: pip install 'fitplan[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def palette(n: int) -> list[tuple[float, float, float]]:
    """n distinct colours: tab20's strong colours, then its light ones (its greys left out: grey
    is the reserve's), then tab20b and tab20c; repeats only past 56 components."""
    from matplotlib import colormaps

    tab20 = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    colours = tab20[0::2] + tab20[1::2] + list(colormaps["tab20b"].colors) + list(colormaps["tab20c"].colors)
    colours = list(dict.fromkeys(colours))
    return [colours[i % len(colours)] for i in range(n)]


def job_lines(est: Estimate, spec: RunSpec | None = None) -> list[str]:
    """What the figure is for, in two lines: from the Estimate's layout, and from the spec (when
    given) the workload, runtime, seq and micro-batch (without it, micro-batch comes from
    global batch / (dp x accum), and seq goes unsaid)."""
    layout = est.layout
    model = str(layout.get("model", "model"))
    draft = layout.get("draft")
    workload = spec.workload if spec is not None else ("eagle3" if draft else "sft")
    if workload == "eagle3":
        first = f"Eagle3 draft training for {model}" + (f" (draft {draft})" if draft and draft != model else "")
    else:
        first = f"{workload.upper()} of {model}"
    first += f" on {est.world}x {layout.get('gpu', 'GPU')}"
    if spec is not None and spec.runtime != "fitplan":
        first += f", {spec.runtime} runtime"
    second: list[str] = []
    if spec is not None:
        second += [f"seq {spec.seq}", f"micro-batch {spec.micro_batch}"]
    dp, accum, global_batch = layout.get("dp"), layout.get("accum"), layout.get("global_batch")
    if spec is None and dp and accum and global_batch:
        second.append(f"micro-batch {global_batch // (dp * accum)}")
    if global_batch:
        second.append(f"global batch {global_batch}" + (f" (accum {accum})" if accum else ""))
    second += [f"{k} {layout[k]}" for k in ("tp", "dp") if layout.get(k) is not None]
    return [first, ", ".join(second)]


def figure(est: Estimate, spec: RunSpec | None = None) -> Figure:
    """The breakdown as a matplotlib Figure (the caller saves and closes it)."""
    plt = _matplotlib()
    phases = list(est.phases)
    names = component_names(est)
    width = max(7.0, 1.3 * len(phases) + 4.5)
    fig, ax = plt.subplots(figsize=(width, 6.0), layout="constrained")
    bottoms = [0.0] * len(phases)
    for name, colour in zip(names, palette(len(names))):
        heights = [est.phases[p].get(name, 0) / GIB for p in phases]
        ax.bar(phases, heights, bottom=bottoms, label=name, color=colour, edgecolor="white", linewidth=0.5)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    extras = (est.allocator_reserve_bytes + est.outside_allocator_bytes) / GIB
    ax.bar(phases, [extras] * len(phases), bottom=bottoms, label=RESERVE_LABEL,
           color="lightgrey", hatch="//", edgecolor="grey", linewidth=0.5)
    total = est.gpu_total_bytes / GIB
    ax.axhline(total, color="black", linestyle="--", linewidth=1.2,
               label=f"device total ({gib(est.gpu_total_bytes)} GiB)")
    peak = phases.index(est.peak_phase)
    top = max(b + extras for b in bottoms)
    # the device-level peak, over the peak phase's bar (whose top counts the whole allocator reserve)
    ax.annotate(f"peak {gib(est.peak_reserved_bytes)} GiB", (peak, bottoms[peak] + extras), xytext=(0, 6),
                textcoords="offset points", ha="center", fontweight="bold")
    ax.set_ylim(0, max(top, total, est.peak_reserved_bytes / GIB) * 1.12)
    ax.set_xticks(range(len(phases)), [p.replace("_", "\n") for p in phases])
    ax.get_xticklabels()[peak].set_fontweight("bold")
    ax.set_ylabel("GiB per GPU")
    ax.set_xlabel("phase (steady state, step >= 2)")

    first, second = job_lines(est, spec)
    fig.suptitle(f"{first}\n{second}", fontsize="large", fontweight="bold")
    chars = int(width * 10)  # about what fits across the axes at the default title size
    ax.set_title(textwrap.fill(verdict(est), chars), color="green" if est.fits else "darkred", fontsize="medium")

    handles, labels = ax.get_legend_handles_labels()
    stacked = [i for i, label in enumerate(labels) if label in names or label == RESERVE_LABEL]
    others = [i for i in range(len(labels)) if i not in stacked]
    order = stacked[::-1] + others  # the legend reads top-down, as the stack does
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right center",
               fontsize="small", frameon=False)
    return fig


# Image formats --plot writes (by the file's suffix): what matplotlib writes with no extra software.
FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")


def output_path(path: str | Path, flag: str = "--plot", also: tuple[str, ...] = ()) -> Path:
    """The file `--plot PATH` will write, checked before anything is computed: PATH itself, or
    PATH.png when it has no suffix (as matplotlib names it). A folder, a missing or unwritable
    folder, or a suffix matplotlib cannot write (nor one of `also`) is a one-line error."""
    import os

    _matplotlib()  # without matplotlib, say so before the estimate runs
    given = Path(path)
    if str(path).strip() == "":
        raise FitplanError(f"{flag} needs a file name, e.g. {flag} estimate.png")
    if given.is_dir():
        raise FitplanError(f"{flag} {path} is a folder; give an image file name, e.g. {given / 'estimate.png'}")
    out = given if given.suffix else given.with_name(given.name + ".png")
    fmt = out.suffix[1:].lower()
    if fmt not in FORMATS and out.suffix.lower() not in also:
        raise FitplanError(f"{flag} {path}: cannot write a {out.suffix!r} image; accepted suffixes: "
                           + ", ".join(["." + f for f in FORMATS] + list(also)))
    if out.is_dir():
        raise FitplanError(f"{flag} {path}: {out} is a folder; give an image file name")
    folder = out.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FitplanError(f"{flag} {path}: the folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise FitplanError(f"{flag} {path}: {out if out.exists() else folder} is not writable")
    return out


def plot_estimate(est: Estimate, path: str | Path, spec: RunSpec | None = None) -> Path:
    """Draw the breakdown to the file output_path(path) names; returns that file."""
    out = output_path(path)
    plt = _matplotlib()
    fig = figure(est, spec)
    try:
        fig.savefig(out, dpi=DPI, format=out.suffix[1:].lower())
    except OSError as exc:
        raise FitplanError(f"--plot {out}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)
    return out
