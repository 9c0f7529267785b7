"""The `adaptrix` command: parses options, calls the API, prints. The work lives in the API.

One module per command group; each registers its commands on the shared typer app.
"""

from __future__ import annotations

from adaptrix.cli import check, compile, inspect, run  # noqa: F401  (register the commands)
from adaptrix.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point."""
    app()
