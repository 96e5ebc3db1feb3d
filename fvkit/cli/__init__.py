"""The ``fvkit`` command line: one module per group of subcommands (see :mod:`fvkit.cli.main`)."""

from fvkit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
