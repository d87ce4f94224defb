"""The several-GPU replay against the measured runs, on two fixed halves.

The 21 several-GPU Eagle3 runs that ran and were replayed (fitplan/validation/replay_table.py
multi_rows) are sorted by name and split alternately: even positions are the "looked-at" half
(whose details may be studied while changing the replay), odd positions the "held-out" half
(judged only by these figures). The split was fixed before any change it judges. For each half:
median and largest |device-level error| of the replay and of the fitted reserve, runs under by
more than 3%; then every row's verdict against what happened.

    python benchmarks/multi_replay_halves.py [-v]
"""

from __future__ import annotations

import statistics
import sys

from fitplan.validation import replay_table


def halves(rows):
    ran = sorted((r for r in rows if r.replayed is not None and r.meas_device), key=lambda r: r.name)
    return {"looked-at": ran[0::2], "held-out": ran[1::2]}


def line(label: str, kind: str, errors: list[float]) -> str:
    worst = min(errors)
    under = sum(e < -3.0 for e in errors)
    return (f"{label:9s} {kind}: {len(errors)} runs, |error| median {statistics.median(map(abs, errors)):.1f}%, "
            f"max {max(map(abs, errors)):.1f}%, under by more than 3% on {under} (worst {worst:+.1f}%)")


def main() -> None:
    verbose = "-v" in sys.argv[1:]
    rows = replay_table.multi_rows()
    for label, part in halves(rows).items():
        for kind in ("replayed", "fitted"):
            print(line(label, kind, [r.device_error(getattr(r, kind)) for r in part]))
        if verbose:
            for r in part:
                print(f"    {r.name:95s} replay {r.device_error(r.replayed):+6.1f}%  "
                      f"fitted {r.device_error(r.fitted):+6.1f}%")
    for r in rows:
        if r.replayed is not None:
            right = r.replayed.fits == (r.outcome == "ran")
            print(f"{'right' if right else 'WRONG'}: {r.name} {r.outcome}, replay says {r.replayed.verdict.value}")


if __name__ == "__main__":
    main()
