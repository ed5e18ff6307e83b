"""What every command group shares: the error type, AWS options and clients, stage names."""

from __future__ import annotations

import argparse
import os

from chalicelib.aws import AwsClients

STAGES = ("dev", "prod")


class OpsError(Exception):
    """An operator-facing failure; the message says what to do."""


def aws_options() -> argparse.ArgumentParser:
    """Parent parser adding --region / --endpoint-url (use with `parents=[aws_options()]`)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("AWS")
    group.add_argument(
        "--region",
        default=None,
        help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / your AWS config)",
    )
    group.add_argument(
        "--endpoint-url",
        default=None,
        help="endpoint override, e.g. a moto server (default: AWS_ENDPOINT_URL)",
    )
    return parent


def clients_from_args(args: argparse.Namespace) -> AwsClients:
    region = (
        args.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or _configured_region()
    )
    if not region:
        raise OpsError("no AWS region: pass --region or set AWS_REGION")
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return AwsClients(region=region, endpoint_url=endpoint)


def _configured_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


def pipeline_stack_name(stage: str) -> str:
    return f"mledge-{stage}-pipeline"


def training_stack_name(stage: str) -> str:
    return f"mledge-{stage}-training"


def device_policy_name(stage: str) -> str:
    """The IoT policy that infra/pipeline.yaml creates for the stage's devices."""
    return f"mledge-{stage}-device"




def signing_key_alias(stage: str) -> str:
    """The KMS alias of the key that signs the stage's releases (infra/pipeline.yaml)."""
    return f"alias/mledge-{stage}-release-signing"
