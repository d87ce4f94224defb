"""`--timeline FILE`: the predicted memory over load, step 1 and a steady step, as the caching
allocator model replays the step's allocations (fitplan/estimator/step_events.py, replayed.py).

Two lines over the event sequence, in the manner of PyTorch's memory_viz: the bytes the tensors
hold (allocated) and the bytes the allocator holds (reserved); the GPU's limit for the allocator;
the phases as shaded bands; the largest single request marked where it is made. A `.html` file
holds the figure as inline SVG with the job's figures beside it; any other suffix is an image.
Optionally a measured snapshot (torch.cuda.memory._dump_snapshot, as `fitplan train
--memory-snapshot` writes it) is drawn below, on its own event axis, for comparison.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fitplan.errors import FitplanError
from fitplan.layout import Job
from fitplan.render.estimate import GIB
from fitplan.render.plot import DPI, _matplotlib, job_lines, palette

HTML_SUFFIXES = (".html", ".htm")


def allocated_over_time(events) -> list[tuple[int, int]]:
    """(event index, bytes requested and not yet freed) after every event."""
    sizes: dict[Any, int] = {}
    live, points = 0, []
    for index, event in enumerate(events):
        if event.op == "alloc":
            sizes[event.key] = event.size
            live += event.size
        else:
            live -= sizes.pop(event.key, 0)
        points.append((index, live))
    return points


def largest_request(events) -> tuple[int, int]:
    """(event index, bytes) of the largest allocation."""
    best = (0, 0)
    for index, event in enumerate(events):
        if event.op == "alloc" and event.size > best[1]:
            best = (index, event.size)
    return best


def modelled_step(job: Job):
    """(StepEvents, ReplayedStep) of the job, or a one-line refusal for a layout not modelled."""
    from fitplan.estimator import replayed, step_events

    reason = step_events.unsupported(job)
    if reason is not None:
        raise FitplanError(f"--timeline: {reason}")
    return step_events.build(job), replayed.replay_step(job)


def _steps(points: list[tuple[int, int]], end: int) -> tuple[list[int], list[float]]:
    """A step line through (index, bytes) changes, in GiB, carried to `end`."""
    xs, ys = [], []
    for index, value in points:
        xs.append(index)
        ys.append(value / GIB)
    if xs:
        xs.append(end)
        ys.append(ys[-1])
    return xs, ys


def _draw_phases(ax, phases, colours) -> None:
    """Shaded band per phase (step 1 and steady alike share a colour), labelled at the top."""
    names = list(dict.fromkeys(label.split(".")[-1] for label, _, _ in phases))
    colour = dict(zip(names, colours))
    for label, first, end in phases:
        name = label.split(".")[-1]
        ax.axvspan(first, end, color=colour[name], alpha=0.12, linewidth=0)
        ax.text((first + end) / 2, 1.0, label.replace("step1.", "1:").replace("steady.", "2:"), rotation=90,
                fontsize=6, ha="center", va="top", transform=ax.get_xaxis_transform())


def timeline_path(path: Path) -> Path:
    """--timeline's file, checked before anything is computed (an image, or .html)."""
    from fitplan.render.plot import output_path

    return output_path(path, flag="--timeline", also=HTML_SUFFIXES)


def draw(job: Job, est, path: Path, measured: Path | None = None) -> Path:
    plt = _matplotlib()
    built, replay = modelled_step(job)
    rows = 2 if measured is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4.2 * rows), dpi=DPI, squeeze=False)
    ax = axes[0][0]
    end = len(built.events)
    _draw_phases(ax, built.phases, palette(12))
    ax.plot(*_steps(allocated_over_time(built.events), end), drawstyle="steps-post", color="tab:blue",
            linewidth=1.2, label="allocated (tensors)")
    ax.plot(*_steps(list(replay.reserved_over_time), end), drawstyle="steps-post", color="tab:red",
            linewidth=1.2, label="reserved (allocator model)")
    top = 1.25 * max(replay.peak_reserved, replay.peak_allocated)
    if replay.capacity <= top:
        ax.axhline(replay.capacity / GIB, color="black", linestyle="--", linewidth=1,
                   label=f"limit for the allocator ({replay.capacity / GIB:.1f} GiB)")
        top = 1.05 * replay.capacity
    else:  # far above the step: drawn, it would flatten the lines
        ax.plot([], [], " ", label=f"limit for the allocator: {replay.capacity / GIB:.1f} GiB (above the chart)")
    ax.set_ylim(0, top / GIB)
    where, size = largest_request(built.events)
    ax.axvline(where, color="tab:purple", linestyle=":", linewidth=1,
               label=f"largest request ({size / GIB:.2f} GiB: {built.names.get(built.events[where].key, '?')})")
    ax.set_xlim(0, end)
    ax.set_ylabel("GiB")
    ax.set_xlabel("allocation events (load, step 1, steady step)")
    verdict = "OOM" if replay.num_ooms else ("fits after freeing the cache" if replay.num_alloc_retries else "fits")
    ax.set_title("\n".join(job_lines(est, job.spec)) + f"\nreplay: peak reserved {replay.peak_reserved / GIB:.2f} GiB, "
                 f"{replay.num_alloc_retries} retries, {replay.num_ooms} OOMs: {verdict}", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    if measured is not None:
        _draw_measured(axes[1][0], measured)
    fig.tight_layout()
    return _save(fig, path, job, est, replay)


def _draw_measured(ax, snapshot: Path) -> None:
    """A recorded step: allocated from its allocs and frees, reserved from its segment events."""
    from fitplan.allocator.trace import load_snapshot, read_trace

    recorded = read_trace(load_snapshot(snapshot))
    end = len(recorded.events)
    ax.plot(*_steps(allocated_over_time(recorded.events), end), drawstyle="steps-post", color="tab:blue",
            linewidth=1.2, label="allocated (measured)")
    reserved = [(index, after) for index, _, _, after in recorded.segment_log]
    ax.plot(*_steps(reserved, end), drawstyle="steps-post", color="tab:red", linewidth=1.2,
            label="reserved (measured)")
    ax.set_xlim(0, max(end, 1))
    ax.set_ylabel("GiB")
    ax.set_xlabel(f"allocation events recorded in {snapshot.name}")
    ax.legend(fontsize=7, loc="upper left")


def _save(fig, path: Path, job: Job, est, replay) -> Path:
    if path.suffix.lower() not in HTML_SUFFIXES:
        fig.savefig(path)
        return path
    import io

    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    facts = [("peak allocated (estimate)", est.peak_allocated_bytes), ("peak reserved (replay)", replay.peak_reserved),
             ("limit for the allocator", replay.capacity)]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v / GIB:.2f} GiB</td></tr>" for k, v in facts)
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>fitplan timeline: {html.escape(job.spec.model)}"
                    f"</title><body>{svg.getvalue()}<table>{rows}<tr><td>retries</td><td>{replay.num_alloc_retries}"
                    f"</td></tr><tr><td>OOMs</td><td>{replay.num_ooms}</td></tr></table></body>")
    return path
