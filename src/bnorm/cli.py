"""The ``bnorm`` command: ``bnorm study ...`` (the main job) and ``bnorm bench ...``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

# Each subcommand lives in its own module, imported only when it runs (main() builds the
# parser of the command it was given), exposing ``add_arguments(parser)`` and
# ``main(args) -> int``.
_SUBCOMMANDS = {
    "study": ("bnorm.study.cli", "run the classic experiments with and without BN; write a report"),
    "bench": ("bnorm.bench", "measure bnorm against PyTorch eager and torch.compile"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``bnorm`` parser. Each subcommand in ``commands`` (default: all) is imported and
    gets its arguments; the others are only listed, with their summary."""
    wanted = set(_SUBCOMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="bnorm",
        description="Batch normalization for PyTorch: study what BN does, benchmark the layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in _SUBCOMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=summary, description=summary)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=summary,
            description=(module.__doc__ or summary).strip().splitlines()[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument that is not an option (bnorm has none of its own
    # but --help): only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in _SUBCOMMANDS else [])
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
