"""The hand-written Lambda IAM policies (.chalice/policy-<stage>.json) cover the code.

An AST scan of app.py and chalicelib/**/*.py finds every AWS client call: a
method call on an object whose name contains a service name (`clients.s3`,
`self._s3`, `events_client`, `state.dynamodb`, `clients.client("iot")`) or a
DynamoDB `table`. Each call maps to IAM actions through botocore's operation
names plus a table of the calls whose IAM action differs. A method on such an
object that is neither an operation of the service, a known client helper, nor
a plain container method fails the test (so a new kind of call cannot slip
past unmapped). Every action must then be allowed by each stage's policy, which
must keep to the stage's resources and never allow wildcard actions or `*`.
"""

from __future__ import annotations

import ast
import fnmatch
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

STAGES = ("dev", "prod")
ACCOUNT = "123456789012"

# Object-name fragment -> service (matched longest first).
SERVICE_OF_NAME = {
    "dynamodb": "dynamodb", "sagemaker": "sagemaker", "cloudwatch": "cloudwatch",
    "events": "events", "batch": "batch", "logs": "logs", "iot": "iot", "iam": "iam",
    "sqs": "sqs", "sts": "sts", "s3": "s3", "table": "dynamodb", "athena": "athena",
    "glue": "glue",
}
# Client methods that are not API operations, and what they need.
CLIENT_HELPERS: dict[str, tuple[str, ...]] = {
    "upload_file": ("s3:PutObject",),
    "upload_fileobj": ("s3:PutObject",),
    "download_file": ("s3:GetObject",),
    "download_fileobj": ("s3:GetObject",),
    "copy": ("s3:GetObject", "s3:PutObject"),
}
# Where the IAM action differs from the operation's name.
IAM_ACTIONS: dict[str, tuple[str, ...]] = {
    "s3:HeadObject": ("s3:GetObject",),
    "s3:HeadBucket": ("s3:ListBucket",),
    "s3:ListObjects": ("s3:ListBucket",),
    "s3:ListObjectsV2": ("s3:ListBucket",),
    "s3:ListObjectVersions": ("s3:ListBucketVersions",),
    "s3:CopyObject": ("s3:GetObject", "s3:PutObject"),
    "s3:DeleteObjects": ("s3:DeleteObject",),
    "dynamodb:TransactWriteItems": ("dynamodb:PutItem", "dynamodb:UpdateItem",
                                    "dynamodb:DeleteItem", "dynamodb:ConditionCheckItem"),
    "dynamodb:TransactGetItems": ("dynamodb:GetItem",),
    "sqs:SendMessageBatch": ("sqs:SendMessage",),
    "sqs:DeleteMessageBatch": ("sqs:DeleteMessage",),
    "sqs:ChangeMessageVisibilityBatch": ("sqs:ChangeMessageVisibility",),
    # Requests in this code base carry tags and roles, which need their own permissions.
    "sagemaker:CreateTrainingJob": ("sagemaker:CreateTrainingJob", "sagemaker:AddTags",
                                    "iam:PassRole"),
    "batch:SubmitJob": ("batch:SubmitJob", "batch:TagResource"),
    "iot:CreateJob": ("iot:CreateJob", "iot:TagResource", "iam:PassRole"),
    # Athena acts with the caller's permissions: the Glue table, S3 reads and writes.
    "athena:StartQueryExecution": ("athena:StartQueryExecution", "glue:GetDatabase",
                                   "glue:GetTable", "glue:GetPartitions",
                                   "s3:GetBucketLocation", "s3:AbortMultipartUpload",
                                   "s3:ListMultipartUploadParts"),
}
# Actions a Chalice event source needs (the Lambda service calls them with the role).
EVENT_SOURCE_ACTIONS = {
    "on_sqs_message": ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"),
}
ALWAYS = ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")
# Call sites that never run in Lambda, with the reason.
NOT_IN_LAMBDA = {
    ("chalicelib/tables.py", "create_tables"): "creates tables for tests and the local stack",
}
CONTAINER_METHODS = set(dir(dict)) | set(dir(list)) | set(dir(str)) | set(dir(set))


@dataclass(frozen=True)
class CallSite:
    path: str
    line: int
    function: str
    service: str
    method: str
    argument: str | None  # first positional string literal, if any


def source_files() -> list[Path]:
    return [REPO / "app.py", *sorted((REPO / "chalicelib").rglob("*.py"))]


def receiver_service(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        # clients.client("iot").create_job(...)
        if node.func.attr == "client" and node.args and isinstance(node.args[0], ast.Constant):
            return str(node.args[0].value)
        return None
    if isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.Name):
        name = node.id
    else:
        return None
    lowered = name.lower()
    for token in sorted(SERVICE_OF_NAME, key=len, reverse=True):
        if token in lowered:
            return SERVICE_OF_NAME[token]
    return None


def scan_calls(path: Path, relative: str | None = None) -> list[CallSite]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    relative = relative or path.relative_to(REPO).as_posix()
    sites: list[CallSite] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                service = receiver_service(child.func.value)
                if service:
                    first = child.args[0] if child.args else None
                    literal = (first.value if isinstance(first, ast.Constant)
                               and isinstance(first.value, str) else None)
                    sites.append(CallSite(relative, child.lineno, inner, service,
                                          child.func.attr, literal))
            visit(child, inner)

    visit(tree, "<module>")
    return sites


@cache
def operations(service: str) -> dict[str, str]:
    """snake_case method -> API operation name, from botocore's service model."""
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(op): op for op in model.operation_names}


class UnmappedCallError(AssertionError):
    pass


def actions_for(site: CallSite) -> tuple[str, ...]:
    """IAM actions one call needs; () for a non-client method on a service-named object."""
    ops = operations(site.service)
    where = f"{site.path}:{site.line} {site.service}.{site.method}"
    if site.method in ("get_paginator", "generate_presigned_url"):
        if site.argument not in ops:
            raise UnmappedCallError(f"{where}: needs a literal operation name, got {site.argument}")
        method = site.argument
    elif site.method in CLIENT_HELPERS:
        return CLIENT_HELPERS[site.method]
    elif site.method in ops:
        method = site.method
    elif site.method in CONTAINER_METHODS:
        return ()  # e.g. record["s3"].get(...): a dict that happens to be named after a service
    else:
        raise UnmappedCallError(
            f"{where}: not an operation of {site.service} nor a known helper; map it in "
            "tests/infra/test_policy.py"
        )
    action = f"{site.service}:{ops[method]}"
    return IAM_ACTIONS.get(action, (action,))


def event_source_actions() -> set[str]:
    tree = ast.parse((REPO / "app.py").read_text(encoding="utf-8"))
    needed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            needed.update(EVENT_SOURCE_ACTIONS.get(node.func.attr, ()))
    return needed


def required_actions() -> dict[str, list[str]]:
    """IAM action -> the call sites that need it."""
    needed: dict[str, list[str]] = {a: ["Lambda logging"] for a in ALWAYS}
    for action in event_source_actions():
        needed.setdefault(action, []).append("app.py event source")
    for path in source_files():
        for site in scan_calls(path):
            if (site.path, site.function) in NOT_IN_LAMBDA:
                continue
            for action in actions_for(site):
                needed.setdefault(action, []).append(f"{site.path}:{site.line}")
    return needed


def load_policy(stage: str) -> dict[str, Any]:
    return json.loads((REPO / ".chalice" / f"policy-{stage}.json").read_text(encoding="utf-8"))


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def allows(policy: dict[str, Any], action: str, resource: str | None = None) -> bool:
    """Whether an Allow statement grants the action (on the resource, when given).

    Conditions are ignored: they only narrow a grant.
    """
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower())
                   for pattern in as_list(statement["Action"])):
            continue
        if resource is None or any(fnmatch.fnmatchcase(resource, pattern)
                                   for pattern in as_list(statement["Resource"])):
            return True
    return False


# ------------------------------------------------------------------ tests --


def test_scan_sees_client_calls_and_ignores_dicts(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(clients, record, self):\n"
        "    clients.s3.put_object(Bucket='b', Key='k', Body=b'')\n"
        "    self._s3.head_object(Bucket='b', Key='k')\n"
        "    clients.s3.get_paginator('list_objects_v2')\n"
        "    clients.client('iot').create_job(jobId='j')\n"
        "    (record['s3'] or {}).get('x')\n"
        "    s3 = record['s3']\n"
        "    s3.get('bucket')\n"
    )
    sites = scan_calls(sample, "sample.py")
    actions = {a for site in sites for a in actions_for(site)}
    assert actions == {"s3:PutObject", "s3:GetObject", "s3:ListBucket", "iot:CreateJob",
                       "iot:TagResource", "iam:PassRole"}


def test_scan_fails_on_an_unmapped_call(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(clients):\n    clients.s3.put_objekt(Bucket='b')\n")
    (site,) = scan_calls(sample, "sample.py")
    with pytest.raises(UnmappedCallError, match="put_objekt"):
        actions_for(site)


def test_the_code_makes_aws_calls_to_check() -> None:
    # Not vacuous: the pipeline's code does call AWS (ingest writes to S3 at least).
    assert "s3:PutObject" in required_actions()


@pytest.mark.parametrize("stage", STAGES)
def test_policy_allows_every_action_the_code_needs(stage) -> None:
    policy = load_policy(stage)
    missing = {a: where for a, where in required_actions().items() if not allows(policy, a)}
    assert not missing, f"policy-{stage}.json lacks: {json.dumps(missing, indent=1)}"


@pytest.mark.parametrize("stage", STAGES)
def test_policy_has_no_wildcard_actions_or_resources(stage) -> None:
    for statement in load_policy(stage)["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement and "NotResource" not in statement
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"{statement['Sid']}: {action}"
        for resource in as_list(statement["Resource"]):
            assert resource != "*", statement["Sid"]
            assert not resource.endswith(":*:*"), statement["Sid"]


@pytest.mark.parametrize("stage", STAGES)
def test_policy_is_scoped_to_the_stage(stage) -> None:
    policy = load_policy(stage)
    other = next(s for s in STAGES if s != stage)
    bucket = f"arn:aws:s3:::mledge-{stage}-data-{ACCOUNT}"
    region = "us-east-1"
    grants = [
        ("s3:PutObject", f"{bucket}/raw/vibration-anomaly/dt=2024-01-01/hour=00/b.jsonl.gz"),
        ("s3:GetObject", f"{bucket}/releases/digits/v00001/model.onnx"),
        ("s3:ListBucket", bucket),
        ("dynamodb:UpdateItem", f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/mledge-{stage}-state"),
        ("dynamodb:PutItem", f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/mledge-{stage}-registry"),
        ("sqs:ReceiveMessage", f"arn:aws:sqs:{region}:{ACCOUNT}:mledge-{stage}-telemetry"),
        ("sqs:DeleteMessage", f"arn:aws:sqs:{region}:{ACCOUNT}:mledge-{stage}-raw-events"),
        ("batch:SubmitJob", f"arn:aws:batch:{region}:{ACCOUNT}:job-queue/mledge-{stage}-gpu"),
        ("batch:SubmitJob",
         f"arn:aws:batch:{region}:{ACCOUNT}:job-definition/mledge-{stage}-training:3"),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/mledge-{stage}-training"),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/mledge-{stage}-iot-jobs-presign"),
    ]
    for action, resource in grants:
        assert allows(policy, action, resource), (action, resource)
    denied = [
        ("s3:PutObject", f"arn:aws:s3:::mledge-{other}-data-{ACCOUNT}/raw/x"),
        ("s3:PutObject", f"{bucket}/models/x/output/model.tar.gz"),  # only training writes models/
        ("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/releases/x"),
        ("dynamodb:UpdateItem", f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/mledge-{other}-state"),
        ("sqs:ReceiveMessage", f"arn:aws:sqs:{region}:{ACCOUNT}:mledge-{other}-telemetry"),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/mledge-{other}-training"),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin"),
        ("batch:SubmitJob", f"arn:aws:batch:{region}:{ACCOUNT}:job-queue/mledge-{other}-gpu"),
    ]
    for action, resource in denied:
        assert not allows(policy, action, resource), (action, resource)


@pytest.mark.parametrize("stage", STAGES)
def test_pass_role_goes_only_to_the_training_and_presign_roles(stage) -> None:
    passes = [s for s in load_policy(stage)["Statement"] if "iam:PassRole" in as_list(s["Action"])]
    targets = {
        (resource, statement["Condition"]["StringEquals"]["iam:PassedToService"])
        for statement in passes for resource in as_list(statement["Resource"])
    }
    assert targets == {
        (f"arn:aws:iam::*:role/mledge-{stage}-training", "sagemaker.amazonaws.com"),
        (f"arn:aws:iam::*:role/mledge-{stage}-iot-jobs-presign", "iot.amazonaws.com"),
    }
    for statement in passes:
        assert as_list(statement["Action"]) == ["iam:PassRole"]


def test_stage_policies_differ_only_in_the_stage() -> None:
    dev = json.dumps(load_policy("dev"))
    # Glue database names take no '-' (Athena): mledge_<stage>_data.
    assert json.loads(dev.replace("-dev-", "-prod-").replace("_dev_", "_prod_")) == \
        load_policy("prod")


def test_chalice_config_points_each_stage_at_its_policy() -> None:
    config = json.loads((REPO / ".chalice" / "config.json").read_text())
    assert config["autogen_policy"] is False
    for stage in STAGES:
        assert config["stages"][stage]["iam_policy_file"] == f"policy-{stage}.json"
