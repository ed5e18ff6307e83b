"""Which stage a command talks to, and that stage's settings, from `.chalice/config.json`.

The stage comes from `--stage` (after the subcommand or before it: `mledge --stage prod
models`), else `MLEDGE_STAGE`, else `dev`. Its settings are the environment variables
`.chalice/config.json` gives that stage's functions (what `mledge stack-config` wrote
there), so no variable has to be exported by hand. The AWS side (region, credentials,
`AWS_ENDPOINT_URL`) comes from the usual AWS configuration and the flags.

Without `--stage`, an environment that already names a bucket (`MLEDGE_BUCKET`: the
local stack's env.json, tests) is used as it is.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from chalicelib.aws import AwsClients
from chalicelib.runtime import Runtime, get_runtime
from chalicelib.settings import Settings, SettingsError, chalice_stage_environment
from mledge_ops.common import OpsError

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CHALICE_CONFIG = PROJECT_DIR / ".chalice" / "config.json"


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """`mledge --stage S --chalice-config F COMMAND ...` (dests apart from the subcommands')."""
    parser.add_argument("--stage", dest="global_stage", default=None,
                        help="the stage to work on (default: MLEDGE_STAGE, else dev)")
    parser.add_argument("--chalice-config", dest="global_chalice_config", type=Path,
                        default=None, help=f"default: {DEFAULT_CHALICE_CONFIG}")


def stage_options() -> argparse.ArgumentParser:
    """Parent parser giving a subcommand `--stage` and `--chalice-config`."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("stage")
    group.add_argument("--stage", default=None,
                       help="the stage to work on (default: MLEDGE_STAGE, else dev)")
    group.add_argument("--chalice-config", type=Path, default=None,
                       help=f"the stage settings (default: {DEFAULT_CHALICE_CONFIG})")
    return parent


def resolve(args: argparse.Namespace) -> None:
    """Fill `args.stage` / `args.chalice_config` from the global options and defaults;
    `args.stage_given` says whether the user named a stage."""
    stage = getattr(args, "stage", None) or getattr(args, "global_stage", None)
    args.stage_given = stage is not None
    args.stage = stage or os.environ.get("MLEDGE_STAGE") or "dev"
    args.chalice_config = (getattr(args, "chalice_config", None)
                           or getattr(args, "global_chalice_config", None)
                           or DEFAULT_CHALICE_CONFIG)


def stage_environment(args: argparse.Namespace) -> dict[str, str]:
    try:
        return chalice_stage_environment(args.chalice_config, args.stage)
    except SettingsError as exc:
        raise OpsError(str(exc)) from None


def runtime_for(args: argparse.Namespace) -> Runtime:
    """The settings, clients and pipeline config of the stage the command names."""
    if not args.stage_given and os.environ.get("MLEDGE_BUCKET"):
        return get_runtime()
    env = stage_environment(args)
    # AWS_* (region, endpoint, credentials) stay the caller's; the stage names the rest.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if getattr(args, "region", None):
        env["AWS_REGION"] = args.region
    if getattr(args, "endpoint_url", None):
        env["AWS_ENDPOINT_URL"] = args.endpoint_url
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        import boto3

        region = boto3.session.Session().region_name
        if region:
            env["AWS_REGION"] = region
    env.setdefault("MLEDGE_STAGE", args.stage)
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        raise OpsError(f"stage {args.stage} in {args.chalice_config}: {exc}") from None
    return Runtime.from_settings(settings, AwsClients.for_settings(settings))
