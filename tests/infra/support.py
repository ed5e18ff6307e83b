"""Helpers for the infra tests: the templates, cfn-lint, and deploying into moto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import REPO

INFRA = REPO / "infra"
PIPELINE_TEMPLATE = INFRA / "pipeline.yaml"
TRAINING_TEMPLATE = INFRA / "training.yaml"
TEMPLATES = sorted(INFRA.glob("*.yaml"))
ACCOUNT = "123456789012"

# Resource types moto 5.2.5's CloudFormation cannot create (it warns and skips
# them): their properties are asserted on the template instead.
MOTO_UNSUPPORTED_TYPES = {
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::IoT::TopicRule",
    "AWS::CloudWatch::Alarm",
    "AWS::Glue::Database",
    "AWS::Glue::Table",
    "AWS::Athena::WorkGroup",
}


def load_template(path: Path) -> dict[str, Any]:
    """The template as plain data with short tags expanded (`!Sub` -> `Fn::Sub`)."""
    from cfnlint.decode import decode

    template, errors = decode(str(path))
    assert not errors, f"{path}: {errors}"
    return template


def lint(path: Path) -> list[str]:
    """cfn-lint findings (errors, warnings and informational) for one template."""
    from cfnlint.api import ManualArgs, lint_file

    return [str(match) for match in lint_file(Path(path), ManualArgs())]


def lint_text(text: str) -> list[str]:
    from cfnlint.api import ManualArgs, lint

    return [str(match) for match in lint(text, ManualArgs())]


def deploy_stacks(
    stage: str, *, region: str = "us-east-1", training: bool = True
) -> dict[str, dict[str, str]]:
    """Create both stacks in the active moto mock; returns outputs by stack name.

    moto needs three things real AWS does not: a Batch service role (real
    Batch uses its service-linked role when BatchServiceRoleArn is empty), an
    explicit GpuInstanceTypes (moto does not split a CommaDelimitedList
    default) and existing subnets/security groups (as AWS also does).
    """
    import boto3

    iam = boto3.client("iam", region_name=region)
    ec2 = boto3.client("ec2", region_name=region)
    cfn = boto3.client("cloudformation", region_name=region)
    batch_role = iam.create_role(
        RoleName=f"moto-batch-service-{stage}", AssumeRolePolicyDocument="{}"
    )["Role"]["Arn"]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(
        GroupName=f"batch-{stage}", Description="batch", VpcId=vpc
    )["GroupId"]
    stacks = {
        f"mledge-{stage}-pipeline": (PIPELINE_TEMPLATE, {"Stage": stage}),
        f"mledge-{stage}-training": (
            TRAINING_TEMPLATE,
            {
                "Stage": stage,
                "SubnetIds": subnet,
                "SecurityGroupIds": group,
                "GpuInstanceTypes": "g4dn.xlarge,g4dn.2xlarge",
                "BatchServiceRoleArn": batch_role,
            },
        ),
    }
    if not training:
        del stacks[f"mledge-{stage}-training"]
    outputs: dict[str, dict[str, str]] = {}
    for name, (path, parameters) in stacks.items():
        cfn.create_stack(
            StackName=name,
            TemplateBody=path.read_text(encoding="utf-8"),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=["CAPABILITY_NAMED_IAM"],
        )
        described = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert described["StackStatus"] == "CREATE_COMPLETE", described
        outputs[name] = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
    return outputs
