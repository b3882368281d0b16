"""The ``cryoves`` command line: a thin shell over the core.

Each sub-command lives in its own module of this package and provides
``add_parser(subparsers)`` and ``run(args) -> int``. Heavy imports (TensorFlow, the
pipeline) happen inside ``run`` so that ``cryoves --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryoves import __version__

#: sub-command modules, in help order
COMMANDS = ("segment", "simulate", "train", "evaluate")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` that shows every option's default (unless its help already says it or there is none).

    Descriptions keep their line breaks (write them as plain text, not reST).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.required
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class CliError(Exception):
    """An error with a message meant for the user (printed without a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoves",
        description="Find, fit and fix synaptic vesicles in cryo-electron tomograms.")
    parser.add_argument("--version", action="version", version=f"cryoves {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cryoves.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"cryoves.cli.{name}":
                continue  # sub-command not available in this version
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CliError as err:
        print(f"cryoves {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoves {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
