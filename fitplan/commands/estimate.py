"""fitplan estimate / fitplan profiles (placeholder until the estimator lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
