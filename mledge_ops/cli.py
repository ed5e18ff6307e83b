"""The `mledge` command: a thin dispatcher over one module per command group.

To add a command group, write a module with
`register(subparsers: argparse._SubParsersAction) -> None` that adds its
subcommands and sets `func(args) -> int` on each, then list it in
`COMMAND_MODULES`. Errors meant for the operator are `OpsError`s: printed
without a traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from chalicelib.observability import metrics_off
from mledge_ops.common import OpsError
from mledge_ops.stage import add_global_options, resolve

COMMAND_MODULES: tuple[str, ...] = (
    "mledge_ops.stack_config",
    "mledge_ops.provision",
    "mledge_ops.models_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mledge", description="MLEdgeDeploy operator commands (docs/deploy.md)."
    )
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(args)
    try:
        with metrics_off():  # stdout is the operator's: no EMF lines in it
            return int(args.func(args))
    except OpsError as exc:
        print(f"mledge {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
