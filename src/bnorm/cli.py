"""The ``bnorm`` command: ``bnorm study ...`` (the main job) and ``bnorm bench ...``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each subcommand lives in its own module, imported only when it runs, exposing
# ``add_arguments(parser)`` and ``main(args) -> int``.
_SUBCOMMANDS = {
    "study": ("bnorm.study.cli", "run the classic experiments with and without BN; write a report"),
    "bench": ("bnorm.bench", "measure bnorm against PyTorch eager and torch.compile"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnorm",
        description="Batch normalization for PyTorch: study what BN does, benchmark the layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in _SUBCOMMANDS.items():
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
