"""The `fitplan` command: a typer app whose commands live in fitplan/commands/, one per module.

Each command module defines `register(app)`. The CLI holds no math: it parses flags, calls
the planner, and renders. Heavy imports (torch, matplotlib) happen inside the commands that
need them, so `fitplan estimate` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="fitplan",
    help=(
        "Pre-flight GPU memory planner for Eagle3 draft training and LLM fine-tuning.\n\n"
        "Predict per-GPU peak memory before you burn GPU hours (estimate), find the cheapest "
        "change that makes a job fit (fit), gate configs in CI (check), explain an OOM log "
        "(explain), and run a plan with the embedded trainer to measure it (train)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Command modules, in the order `fitplan --help` lists them.
COMMAND_MODULES = (
    "estimate", "fit", "check", "explain", "validate", "train",
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"fitplan.commands.{_name}").register(app)


if __name__ == "__main__":
    app()
