"""`mledge`: the operator's command line. A thin dispatcher: each command group
module adds its subcommands with `register(subparsers)`; every subcommand sets
`handler(args) -> int` (the exit status)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mledge_ops import models_commands

COMMAND_GROUPS = [models_commands.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mledge",
        description="Operate MLEdgeDeploy: read the fleet's models and versions, start "
                    "trainings, promote and roll back. The stage comes from the environment "
                    "(MLEDGE_BUCKET, MLEDGE_REGISTRY_TABLE, MLEDGE_STATE_TABLE, AWS_*).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
