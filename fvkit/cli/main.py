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
import re
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


#: reST markup the docstrings use (``code``, :role:`target`), which a terminal shows literally.
REST_ROLE = re.compile(r":[a-z]+:`~?([^`]*)`")
REST_LITERAL = re.compile(r"``([^`]*)``")


def plain_text(text: str) -> str:
    """``text`` without reST markup: ``code`` -> code, :class:`x.Y` -> x.Y."""
    return REST_LITERAL.sub(r"\1", REST_ROLE.sub(r"\1", text or ""))


class PlainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` as plain text: no reST markup, and every option's default and choices
    spelled out unless its help already says them."""

    def _format_text(self, text):
        return super()._format_text(plain_text(text))

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        if action.choices is not None and action.option_strings and "choices" not in text \
                and not all(str(c) in text for c in action.choices):
            text += f" (choices: {', '.join(map(str, action.choices))})"
        default = action.default
        flag_only = action.nargs == 0   # store_true/false, help: the flag's presence is the value
        if action.option_strings and "default" not in text and not flag_only \
                and default is not None and default is not argparse.SUPPRESS:
            text += f" (default: {default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fvkit", description=plain_text(__doc__.split("\n")[0]),
                           formatter_class=PlainHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=PlainArgumentParser)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(subparsers)
    for choice in subparsers._choices_actions:   # a subcommand's --help opens with its one-line summary
        sub = subparsers.choices[choice.dest]
        if not sub.description:
            sub.description = plain_text(choice.help)
    return parser


class PlainArgumentParser(OneLineParser):
    """Subcommand parsers: the plain formatter unless one asks for another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", PlainHelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = plain_text(kwargs["description"])
        super().__init__(*args, **kwargs)


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
