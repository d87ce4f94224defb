"""The `fitplan` command: a typer app whose commands live in fitplan/commands/, one per module.

Each command module defines `register(app)`. The CLI holds no math: it parses flags, calls
the planner, and renders. Heavy imports (torch, matplotlib) happen inside the commands that
need them, so `fitplan estimate` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import click
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




@app.callback()
def _commands() -> None:
    # A callback keeps the app a group of commands when only one command module is loaded: a
    # typer app with a single command and no callback runs that command with no command name.
    pass


def wanted_commands(argv: list[str]) -> tuple[str, ...]:
    """The command modules to load: only the one named when it is the first argument (each pulls
    in its own planner modules, and `fitplan estimate` should not pay for `fit`'s or `explain`'s),
    else all of them (`fitplan --help`, a typo: the full list must be there to be shown)."""
    first = argv[1] if len(argv) > 1 else ""
    return (first,) if first in COMMAND_MODULES else COMMAND_MODULES


for _name in wanted_commands(sys.argv):
    importlib.import_module(f"fitplan.commands.{_name}").register(app)


def main() -> None:
    """The `fitplan` program: a bad flag is one line and exit 2, like every other bad input."""
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `fitplan` alone: the help
        sys.exit(2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "fitplan"
        print(f"error: {exc.format_message()} (see '{command} --help')", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
