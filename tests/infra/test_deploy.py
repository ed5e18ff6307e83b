"""Deploy infra/*.yaml into moto's CloudFormation and check what it created.

moto creates most resource types; those in MOTO_UNSUPPORTED_TYPES it skips with
a warning (their properties are checked on the template in
test_infra_templates.py). moto's S3 bucket model also ignores versioning,
public-access block, lifecycle and notification properties of a template, and
its DynamoDB model ignores PointInTimeRecoverySpecification and
TimeToLiveSpecification; the template tests assert those.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from chalicelib.tables import registry_table_definition, state_table_definition
from mledge_ops.common import device_policy_name
from tests.infra.support import (
    ACCOUNT,
    MOTO_UNSUPPORTED_TYPES,
    PIPELINE_TEMPLATE,
    TRAINING_TEMPLATE,
    deploy_stacks,
    load_template,
)

REGION = "us-east-1"
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS")


@pytest.fixture(scope="module")
def deployed() -> Iterator[dict[str, dict[str, str]]]:
    with mock_aws():
        yield deploy_stacks("dev") | deploy_stacks("prod")


def client(service: str):
    return boto3.client(service, region_name=REGION)


def test_both_stages_deploy_side_by_side(deployed) -> None:
    assert set(deployed) == {
        "mledge-dev-pipeline", "mledge-dev-training", "mledge-prod-pipeline", "mledge-prod-training"
    }
    assert deployed["mledge-dev-pipeline"]["BucketName"] == f"mledge-dev-data-{ACCOUNT}"
    assert deployed["mledge-prod-pipeline"]["BucketName"] == f"mledge-prod-data-{ACCOUNT}"


@pytest.mark.parametrize("path", [PIPELINE_TEMPLATE, TRAINING_TEMPLATE], ids=lambda p: p.name)
def test_moto_creates_every_resource_it_supports(deployed, path) -> None:
    template = load_template(path)
    stack = f"mledge-dev-{path.stem}"
    created = {
        r["LogicalResourceId"]: r["ResourceType"]
        for r in client("cloudformation").list_stack_resources(StackName=stack)[
            "StackResourceSummaries"
        ]
        # moto lists each skipped (unsupported) resource as an empty summary
        if r["ResourceStatus"] == "CREATE_COMPLETE" and r["LogicalResourceId"]
    }
    # Conditional resources whose condition is false here (AlarmEmail unset) are not made.
    declared = {k: v["Type"] for k, v in template["Resources"].items() if "Condition" not in v}
    skipped = {k: v for k, v in declared.items() if k not in created}
    assert set(skipped.values()) <= MOTO_UNSUPPORTED_TYPES, skipped
    assert {k: v for k, v in declared.items() if v not in MOTO_UNSUPPORTED_TYPES} == created


def test_outputs_are_exported_under_stage_names(deployed) -> None:
    exports = {e["Name"]: e["Value"] for e in client("cloudformation").list_exports()["Exports"]}
    for stack, outputs in deployed.items():
        stage = stack.split("-")[1]
        for key, value in outputs.items():
            if key == "DevicePolicyName":
                continue  # moto's Ref of AWS::IoT::Policy is an object repr (moto bug)
            assert exports[f"mledge-{stage}-{key}"] == value


def test_bucket_exists_encrypted(deployed) -> None:
    s3 = client("s3")
    bucket = deployed["mledge-dev-pipeline"]["BucketName"]
    s3.head_bucket(Bucket=bucket)
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def test_tables_match_chalicelib_shapes(deployed) -> None:
    dynamodb = client("dynamodb")
    outputs = deployed["mledge-dev-pipeline"]
    for name, definition in ((outputs["RegistryTableName"], registry_table_definition),
                             (outputs["StateTableName"], state_table_definition)):
        table = dynamodb.describe_table(TableName=name)["Table"]
        expected = definition(name)
        assert table["KeySchema"] == expected["KeySchema"]
        assert sorted(table["AttributeDefinitions"], key=str) == sorted(
            expected["AttributeDefinitions"], key=str
        )
        assert table["BillingModeSummary"]["BillingMode"] == expected["BillingMode"]


@pytest.mark.parametrize(("queue", "dlq"), [("TelemetryQueueUrl", "TelemetryDeadLetterQueueUrl"),
                                            ("RawEventsQueueUrl", "RawEventsDeadLetterQueueUrl")])
def test_queues_redrive_to_their_dead_letter_queues(deployed, queue, dlq) -> None:
    sqs = client("sqs")
    outputs = deployed["mledge-dev-pipeline"]
    attributes = sqs.get_queue_attributes(QueueUrl=outputs[queue], AttributeNames=["All"])[
        "Attributes"
    ]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=outputs[dlq], AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    assert json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"] == dlq_arn
    assert int(attributes["VisibilityTimeout"]) >= 120


def test_roles_device_policy_repository_and_batch_exist(deployed) -> None:
    iam = client("iam")
    pipeline, training = deployed["mledge-dev-pipeline"], deployed["mledge-dev-training"]
    for arn in (pipeline["IotPresignRoleArn"], training["TrainingRoleArn"]):
        iam.get_role(RoleName=arn.rsplit("/", 1)[1])
    document = client("iot").get_policy(policyName=device_policy_name("dev"))["policyDocument"]
    assert "${iot:Connection.Thing.ThingName}" in document
    repositories = client("ecr").describe_repositories(repositoryNames=["mledge-dev-training"])
    assert training["TrainingImageUri"] == repositories["repositories"][0]["repositoryUri"] + ":latest"
    batch = client("batch")
    (queue,) = batch.describe_job_queues(jobQueues=[training["BatchJobQueueName"]])["jobQueues"]
    assert queue["computeEnvironmentOrder"][0]["computeEnvironment"] == training[
        "BatchComputeEnvironmentArn"
    ]
    (definition,) = batch.describe_job_definitions(
        jobDefinitionName=training["BatchJobDefinitionName"]
    )["jobDefinitions"]
    container = definition["containerProperties"]
    assert container["image"] == training["TrainingImageUri"]
    assert container["jobRoleArn"] == training["TrainingRoleArn"]
    # moto keeps the Number parameter as an int; AWS returns strings
    requirements = {r["type"]: str(r["value"]) for r in container["resourceRequirements"]}
    # no GPU by default: a GPU family's SubmitJob asks for it
    assert requirements == {"VCPU": "4", "MEMORY": "14336"}
    assert container["command"][:3] == ["python", "-m", "trainer_batch.launcher"]


def test_release_signing_key_is_behind_the_stage_alias(deployed) -> None:
    # moto's CloudFormation makes the key without its KeySpec/KeyUsage (so it cannot sign
    # here); test_infra_templates.py asserts those properties on the template.
    aliases = {a["AliasName"]: a.get("TargetKeyId") for a in client("kms").list_aliases()["Aliases"]}
    for stage in ("dev", "prod"):
        outputs = deployed[f"mledge-{stage}-pipeline"]
        assert outputs["ReleaseSigningKeyAlias"] == f"alias/mledge-{stage}-release-signing"
        assert outputs["ReleaseSigningKeyArn"].endswith(aliases[outputs["ReleaseSigningKeyAlias"]])
