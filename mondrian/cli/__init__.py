"""The `mondrian` command line: one module per command group, assembled in cli/main.py."""

from mondrian.cli.main import cli, main

__all__ = ["cli", "main"]
