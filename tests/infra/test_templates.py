"""Static checks of infra/*.yaml: cfn-lint clean, and the contracts the templates must keep."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from mledge_update.topics import TELEMETRY_ROOT, TELEMETRY_RULE_SQL, jobs_topic_root

from chalicelib.config import load_pipeline_config
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from chalicelib.tables import registry_table_definition, state_table_definition
from mledge_ops.stack_config import OUTPUT_FOR_VARIABLE
from tests.conftest import REPO
from tests.infra.support import (
    PIPELINE_TEMPLATE,
    TEMPLATES,
    TRAINING_TEMPLATE,
    lint,
    lint_text,
    load_template,
)

THING = "${!iot:Connection.Thing.ThingName}"
ARN_PREFIX = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"


@pytest.fixture(scope="module")
def pipeline() -> dict[str, Any]:
    return load_template(PIPELINE_TEMPLATE)


@pytest.fixture(scope="module")
def training() -> dict[str, Any]:
    return load_template(TRAINING_TEMPLATE)


def resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def sub_text(value: Any) -> str:
    """The string of a `Fn::Sub` (either form) or a plain string."""
    if isinstance(value, str):
        return value
    sub = value["Fn::Sub"]
    return sub if isinstance(sub, str) else sub[0]


def test_there_are_templates_to_check() -> None:
    assert {p.name for p in TEMPLATES} >= {"pipeline.yaml", "training.yaml"}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_finds_nothing(path) -> None:
    assert lint(path) == []


def test_cfn_lint_is_wired_to_report_problems() -> None:
    broken = (
        "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Q:\n    Type: AWS::SQS::Queue\n"
        "    Properties:\n      VisibilityTimout: 30\n"
    )
    assert any("VisibilityTimout" in finding for finding in lint_text(broken))


@pytest.mark.parametrize(
    ("logical_id", "definition"),
    [("RegistryTable", registry_table_definition), ("StateTable", state_table_definition)],
)
def test_tables_are_shaped_exactly_as_chalicelib_tables(pipeline, logical_id, definition) -> None:
    properties = pipeline["Resources"][logical_id]["Properties"]
    expected = definition("ignored")
    for key in ("KeySchema", "AttributeDefinitions", "BillingMode"):
        assert json.loads(json.dumps(properties[key])) == expected[key], key
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}


def test_state_table_expires_markers_by_ttl(pipeline) -> None:
    ttl = pipeline["Resources"]["StateTable"]["Properties"]["TimeToLiveSpecification"]
    assert ttl == {"AttributeName": "expires_at", "Enabled": True}
    assert "TimeToLiveSpecification" not in pipeline["Resources"]["RegistryTable"]["Properties"]


def test_thing_groups_are_left_to_the_code_so_adding_a_model_never_edits_infra(
        pipeline) -> None:
    # Packaging and `mledge provision-device` create a model's group (ota.ensure_thing_group).
    assert resources_of_type(pipeline, "AWS::IoT::ThingGroup") == {}
    text = PIPELINE_TEMPLATE.read_text()
    for model in load_pipeline_config(DEFAULT_PIPELINE_CONFIG).models.values():
        assert model.thing_group not in text


def test_release_signing_key_is_an_ecdsa_p256_signing_key_behind_the_stage_alias(
        pipeline) -> None:
    (key,) = resources_of_type(pipeline, "AWS::KMS::Key").values()
    assert key["Properties"]["KeySpec"] == "ECC_NIST_P256"
    assert key["Properties"]["KeyUsage"] == "SIGN_VERIFY"
    assert key["DeletionPolicy"] == "Retain"  # devices trust it: never lose it with a stack
    (alias,) = resources_of_type(pipeline, "AWS::KMS::Alias").values()
    assert sub_text(alias["Properties"]["AliasName"]) == "alias/mledge-${Stage}-release-signing"
    assert pipeline["Outputs"]["ReleaseSigningKeyAlias"]["Value"] == {"Ref": "ReleaseSigningKeyAlias"}


def test_alarms_watch_dead_letters_quarantine_failed_executions_and_trainings(pipeline) -> None:
    alarms = resources_of_type(pipeline, "AWS::CloudWatch::Alarm")
    watched = set()
    for alarm in alarms.values():
        props = alarm["Properties"]
        assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        stats = [m["MetricStat"]["Metric"] for m in props.get("Metrics", []) if "MetricStat" in m]
        metrics = stats or [{"Namespace": props["Namespace"], "MetricName": props["MetricName"],
                             "Dimensions": props["Dimensions"]}]
        for metric in metrics:
            watched.add((metric["Namespace"], metric["MetricName"]))
            if metric["Namespace"] == "MLEdgeDeploy":
                # The stage-wide dimension set chalicelib/observability.py emits.
                assert {d["Name"] for d in metric["Dimensions"]} == {"service", "stage"}
    assert {("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
            ("MLEdgeDeploy", "RecordsQuarantined"), ("MLEdgeDeploy", "RecordsAccepted"),
            ("MLEdgeDeploy", "RolloutFailed"), ("MLEdgeDeploy", "RolloutRejected"),
            ("MLEdgeDeploy", "TrainingsFailed")} <= watched


def test_dashboard_graphs_metrics_the_code_emits(pipeline) -> None:
    from chalicelib import observability

    (dashboard,) = resources_of_type(pipeline, "AWS::CloudWatch::Dashboard").values()
    body_template, _ = dashboard["Properties"]["DashboardBody"]["Fn::Sub"]
    emitted = {value for name, value in vars(observability).items()
               if name.isupper() and isinstance(value, str) and value[:1].isupper()}
    named = set(re.findall(r'"(?:MLEdgeDeploy", |\.", )"([A-Za-z]+)"', body_template))
    graphed = {m for m in named if m not in ("ApproximateNumberOfMessagesVisible",)}
    assert graphed and graphed <= emitted | {f"Rollout{s}" for s in (
        "Succeeded", "InProgress", "Queued", "Failed", "Rejected", "TimedOut")}
    assert {"RecordsQuarantined", "DeviceAnomalies", "TrainingsStarted", "GateApproved",
            "Releases", "ReleaseFullBytes", "RolloutSucceeded"} <= graphed
    # The body is valid JSON once CloudFormation substitutes its variables.
    json.loads(re.sub(r"\$\{[A-Za-z:]+\}", "x", body_template))


def test_topic_rule_sends_the_brief_sql_to_the_telemetry_queue(pipeline) -> None:
    payload = pipeline["Resources"]["TelemetryTopicRule"]["Properties"]["TopicRulePayload"]
    assert " ".join(payload["Sql"].split()) == TELEMETRY_RULE_SQL
    assert payload["AwsIotSqlVersion"] == "2016-03-23"
    (action,) = payload["Actions"]
    assert action["Sqs"]["QueueUrl"] == {"Ref": "TelemetryQueue"}
    assert action["Sqs"]["UseBase64"] is False
    error = payload["ErrorAction"]["S3"]
    assert error["BucketName"] == {"Ref": "DataBucket"}
    assert error["Key"].startswith("quarantine/_iot-rule/")
    role = pipeline["Resources"]["TelemetryRuleRole"]["Properties"]
    statements = role["Policies"][0]["PolicyDocument"]["Statement"]
    allowed = {(s["Action"], json.dumps(s["Resource"])) for s in statements}
    assert ("sqs:SendMessage", json.dumps({"Fn::GetAtt": ["TelemetryQueue", "Arn"]})) in allowed
    assert any(a == "s3:PutObject" and "quarantine/_iot-rule/*" in r for a, r in allowed)


def test_device_policy_confines_each_device_to_its_own_topics(pipeline) -> None:
    document = pipeline["Resources"]["DevicePolicy"]["Properties"]["PolicyDocument"]
    granted: dict[str, set[str]] = {}
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            resources = {sub_text(r).removeprefix(ARN_PREFIX) for r in as_list(statement["Resource"])}
            granted.setdefault(action, set()).update(resources)
    jobs = f"{jobs_topic_root(THING)}/*"
    assert granted == {
        "iot:Connect": {f"client/{THING}"},
        "iot:Publish": {f"topic/{TELEMETRY_ROOT}/*/{THING}/*", f"topic/{jobs}"},
        "iot:Subscribe": {f"topicfilter/{jobs}"},
        "iot:Receive": {f"topic/{jobs}"},
    }
    connect = next(s for s in document["Statement"] if s["Action"] == "iot:Connect")
    assert connect["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}


def test_bucket_is_private_encrypted_versioned_and_tiered(pipeline) -> None:
    bucket = pipeline["Resources"]["DataBucket"]["Properties"]
    (sse,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = {r.get("Prefix"): r for r in bucket["LifecycleConfiguration"]["Rules"]}
    raw, quarantine = rules["raw/"], rules["quarantine/"]
    assert {t["StorageClass"] for t in raw["Transitions"]} <= {"STANDARD_IA", "GLACIER_IR",
                                                              "INTELLIGENT_TIERING"}
    assert "ExpirationInDays" in raw and "ExpirationInDays" in quarantine
    assert all(r["Status"] == "Enabled" for r in rules.values())


def test_raw_object_events_reach_the_raw_events_queue(pipeline) -> None:
    resources = pipeline["Resources"]
    (notification,) = resources["DataBucket"]["Properties"]["NotificationConfiguration"][
        "QueueConfigurations"
    ]
    assert notification["Event"] == "s3:ObjectCreated:*"
    assert notification["Queue"] == {"Fn::GetAtt": ["RawEventsQueue", "Arn"]}
    assert notification["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": "raw/"}]
    # S3 checks it may send when the notification is created: the policy must exist first.
    assert "RawEventsQueuePolicy" in as_list(resources["DataBucket"]["DependsOn"])
    policy = resources["RawEventsQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "RawEventsQueue"}]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    source_arn = sub_text(statement["Condition"]["ArnEquals"]["aws:SourceArn"])
    bucket_name = sub_text(resources["DataBucket"]["Properties"]["BucketName"])
    assert source_arn == f"arn:${{AWS::Partition}}:s3:::{bucket_name}"


@pytest.mark.parametrize(("queue", "dlq"), [("TelemetryQueue", "TelemetryDeadLetterQueue"),
                                            ("RawEventsQueue", "RawEventsDeadLetterQueue")])
def test_lambda_queues_redrive_to_their_dead_letter_queue(pipeline, queue, dlq) -> None:
    properties = pipeline["Resources"][queue]["Properties"]
    assert properties["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": [dlq, "Arn"]}
    # Lambda's SQS event source requires visibility timeout >= the function timeout.
    chalice = json.loads((REPO / ".chalice" / "config.json").read_text())
    default = pipeline["Parameters"][properties["VisibilityTimeout"]["Ref"]]["Default"]
    assert int(default) >= chalice["lambda_timeout"]


NAME_PROPERTIES = {
    "BucketName", "TableName", "QueueName", "RoleName", "RuleName", "PolicyName",
    "RepositoryName", "ComputeEnvironmentName", "JobQueueName", "JobDefinitionName",
    "LogGroupName", "InstanceProfileName",
}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_name_and_export_carries_the_stage(path) -> None:
    template = load_template(path)
    assert template["Parameters"]["Stage"]["AllowedValues"] == ["dev", "prod"]
    named = 0
    for logical_id, resource in template["Resources"].items():
        for key, value in resource.get("Properties", {}).items():
            if key in NAME_PROPERTIES:
                named += 1
                assert "${Stage}" in sub_text(value), f"{logical_id}.{key}"
    assert named >= 5
    for key, output in template["Outputs"].items():
        assert "${Stage}" in sub_text(output["Export"]["Name"]), key


def test_outputs_cover_every_stage_variable(pipeline, training) -> None:
    outputs = set(pipeline["Outputs"]) | set(training["Outputs"])
    assert set(OUTPUT_FOR_VARIABLE.values()) <= outputs
    chalice = json.loads((REPO / ".chalice" / "config.json").read_text())
    for stage in ("dev", "prod"):
        variables = chalice["stages"][stage]["environment_variables"]
        resource_variables = {v for v in variables if v.startswith("MLEDGE_") and v != "MLEDGE_STAGE"}
        assert resource_variables == set(OUTPUT_FOR_VARIABLE), stage


def test_infra_leaves_eventbridge_rules_to_chalice() -> None:
    # The gate's on_cw_event handler makes Chalice create (and delete) the
    # SageMaker/Batch state-change rules; a second copy here would double-deliver.
    for path in TEMPLATES:
        assert not resources_of_type(load_template(path), "AWS::Events::Rule"), path.name


def test_training_role_reads_inputs_writes_models_and_pulls_the_image(training) -> None:
    role = training["Resources"]["TrainingRole"]["Properties"]
    principals = role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]["Service"]
    assert set(principals) == {"sagemaker.amazonaws.com", "ecs-tasks.amazonaws.com"}
    statements = {s["Sid"]: s for s in role["Policies"][0]["PolicyDocument"]["Statement"]}
    reads = [sub_text(r) for r in statements["ReadTrainingInputs"]["Resource"]]
    assert sorted(r.rsplit("}/", 1)[1] for r in reads) == ["datasets/*", "raw/*", "releases/*"]
    assert statements["ReadTrainingInputs"]["Action"] == "s3:GetObject"
    assert sub_text(statements["WriteModels"]["Resource"]).endswith("/models/*")
    assert statements["PullTrainingImage"]["Resource"] == {
        "Fn::GetAtt": ["TrainingRepository", "Arn"]
    }
    assert any(a.startswith("logs:") for a in statements["WriteTrainingLogs"]["Action"])


def test_batch_job_definition_runs_the_image_on_a_gpu(training) -> None:
    resources = training["Resources"]
    environment = resources["GpuComputeEnvironment"]["Properties"]
    compute = environment["ComputeResources"]
    assert environment["Type"] == "MANAGED" and compute["Type"] == "EC2"
    default_types = training["Parameters"][compute["InstanceTypes"]["Ref"]]["Default"]
    assert all(t.startswith("g4dn.") for t in default_types.split(","))
    assert compute["Subnets"] == {"Ref": "SubnetIds"}
    assert compute["SecurityGroupIds"] == {"Ref": "SecurityGroupIds"}
    container = resources["TrainingJobDefinition"]["Properties"]["ContainerProperties"]
    assert "TrainingRepository.RepositoryUri" in sub_text(container["Image"])
    assert container["JobRoleArn"] == {"Fn::GetAtt": ["TrainingRole", "Arn"]}
    # GPU families ask for a GPU in SubmitJob; the definition holds none (CPU families)
    assert {r["Type"] for r in container["ResourceRequirements"]} == {"VCPU", "MEMORY"}
    assert container["Command"][:3] == ["python", "-m", "trainer_batch.launcher"]
    assert {"Name": "MLEDGE_TRAINING_BASE_DIR", "Value": "/opt/ml"} in container["Environment"]
    queue = resources["GpuJobQueue"]["Properties"]
    assert queue["ComputeEnvironmentOrder"][0]["ComputeEnvironment"] == {
        "Ref": "GpuComputeEnvironment"
    }


def test_presign_role_reads_only_releases(pipeline) -> None:
    role = pipeline["Resources"]["IotJobsPresignRole"]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "iot.amazonaws.com"
    }
    (statement,) = role["Policies"][0]["PolicyDocument"]["Statement"]
    assert statement["Action"] == "s3:GetObject"
    assert re.fullmatch(r".*:s3:::mledge-\$\{Stage\}-data-\$\{AWS::AccountId\}/releases/\*",
                        sub_text(statement["Resource"]))
