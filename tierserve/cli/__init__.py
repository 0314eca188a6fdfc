"""The `tierserve` command line: `main` is the console script's entry point."""

from tierserve.cli.main import main

__all__ = ["main"]
