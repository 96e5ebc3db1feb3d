"""The ``fvkit`` command line.

    fvkit specs
    fvkit resolve --model tiny-llama
    fvkit trials --dataset datasets/antonym.json --n-trials 10 --n-shots 10 --seed 0 --out FILE
    fvkit run --model tiny-gpt2 --dataset datasets/antonym.json --fixed-trials FILE --out DIR
    fvkit parity --model_name tiny-llama --dataset_name antonym

Each subcommand lives in its own module and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` on its parser.
A :class:`fvkit.errors.FvkitError` ends the command with its one-line message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from fvkit.errors import DataWarning, FvkitError
from fvkit.signals import Stopped, stop_on_signals

#: Modules that contribute subcommands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "fvkit.cli.models",
    "fvkit.cli.pipeline",
    "fvkit.cli.parity",
)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the option, like every other fvkit error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fvkit", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with stop_on_signals(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except FvkitError as err:
        print(f"fvkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"fvkit {args.command}: interrupted by {stop}; earlier results are unchanged", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"fvkit {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(command: str):
    """Data warnings as one line a researcher reads, not a file:line and a source line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"fvkit {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


if __name__ == "__main__":
    sys.exit(main())
