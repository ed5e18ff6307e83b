"""One hand-written IAM policy per Lambda function (.chalice/policy-<stage>-<function>.json)
holds exactly the actions that function's code calls.

A call graph from each handler in app.py (below) finds the code each function can
run; an AST scan of that code finds every AWS client call: a
method call on an object whose name contains a service name (`clients.s3`,
`self._s3`, `events_client`, `state.dynamodb`, `clients.client("iot")`) or a
DynamoDB `table`. Each call maps to IAM actions through botocore's operation
names plus a table of the calls whose IAM action differs. A method on such an
object that is neither an operation of the service, a known client helper, nor
a plain container method fails the test (so a new kind of call cannot slip
past unmapped). Each function's policy must allow every action its code needs and
no other action, keep to the stage's resources and never allow wildcard actions
or `*`.
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
    "sqs": "sqs", "sts": "sts", "s3": "s3", "kms": "kms", "table": "dynamodb",
    "athena": "athena", "glue": "glue",
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


def call_site(node: ast.AST, relative: str, function: str) -> CallSite | None:
    """The AWS client call `node` is (`<client>.<method>(...)`), or None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    service = receiver_service(node.func.value)
    if not service:
        return None
    first = node.args[0] if node.args else None
    literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
    return CallSite(relative, node.lineno, function, service, node.func.attr, literal)


def scan_calls(path: Path, relative: str | None = None) -> list[CallSite]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    relative = relative or path.relative_to(REPO).as_posix()
    sites: list[CallSite] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            site = call_site(child, relative, inner)
            if site:
                sites.append(site)
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


# ------------------------------------------------------------ call graph --
# Which code each Lambda function can run: from its handler in app.py, follow calls to
# module functions (`ingest.ingest_sqs_event`, imported names, same-module names),
# classes (constructor, `Cls.method`), and methods by name on every chalicelib class
# the reachable code names (rapid type analysis: `registry.get(...)` reaches
# `Registry.get` once `Registry` is reachable). Nested functions and lambdas belong to
# the function that holds them. It over-approximates (a method name reaches every
# reachable class's method of that name) and does not under-approximate for this
# code's style (no getattr by string, no dynamic imports in chalicelib).


@dataclass
class ModuleIndex:
    name: str
    path: Path
    functions: dict[str, ast.AST]
    classes: dict[str, dict[str, ast.AST]]
    imports: dict[str, tuple[str, str | None]]  # alias -> (module, symbol; None: a module)


def _module_name(path: Path) -> str:
    return path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")


@cache
def code_index() -> dict[str, ModuleIndex]:
    index: dict[str, ModuleIndex] = {}
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = ModuleIndex(_module_name(path), path, {}, {}, {})
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                module.functions[node.name] = node
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                # A module-level value (a factory table such as backends._FACTORIES) is
                # followed like a function: the code it names is reachable through it.
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        module.functions[target.id] = node
            elif isinstance(node, ast.ClassDef):
                module.classes[node.name] = {
                    item.name: item for item in node.body
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chalicelib"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if (REPO / (target.replace(".", "/") + ".py")).exists():
                        module.imports[alias.asname or alias.name] = (target, None)
                    else:
                        module.imports[alias.asname or alias.name] = (node.module or "", alias.name)
        index[module.name] = module
    return index


def _resolve(module: str, name: str) -> list[tuple[str, str]]:
    """(kind, key) for a bare name seen in `module`: kind is function, class or module."""
    mod = code_index().get(module)
    if mod is None:
        return []
    if name in mod.functions:
        return [("function", f"{module}:{name}")]
    if name in mod.classes:
        return [("class", f"{module}:{name}")]
    if name in mod.imports:
        target, symbol = mod.imports[name]
        return [("module", target)] if symbol is None else _resolve(target, symbol)
    return []


def reachable_code(handler: str) -> list[tuple[str, ast.AST]]:
    """(module, def node) of every function and method the app.py handler can run."""
    index = code_index()
    seen: set[str] = set()
    classes: set[str] = set()  # "module:Class"
    method_names: set[str] = set()
    work: list[tuple[str, ast.AST]] = []
    reached: list[tuple[str, ast.AST]] = []

    def add_def(key: str, module: str, node: ast.AST) -> None:
        if key not in seen:
            seen.add(key)
            work.append((module, node))
            reached.append((module, node))

    attr_names: set[str] = set()  # attributes read without a call: only properties run

    def runs(name: str, node: ast.AST) -> bool:
        return name.startswith("__") or name in method_names or (
            name in attr_names and _is_property(node))

    def add_class(key: str) -> None:
        if key in classes:
            return
        classes.add(key)
        module, cls = key.split(":")
        for name, node in index[module].classes[cls].items():
            if runs(name, node):
                add_def(f"{key}.{name}", module, node)

    def add_method_name(name: str, called: bool = True) -> None:
        names = method_names if called else attr_names
        if name in names:
            return
        names.add(name)
        for key in list(classes):
            module, cls = key.split(":")
            node = index[module].classes[cls].get(name)
            if node is not None and runs(name, node):
                add_def(f"{key}.{name}", module, node)

    def see(kind: str, key: str, attr: str | None = None) -> None:
        if kind == "function":
            module, name = key.split(":")
            add_def(key, module, index[module].functions[name])
        elif kind == "class":
            add_class(key)
            if attr:
                add_method_name(attr)
        elif kind == "module" and attr:
            for found in _resolve(key, attr):
                see(*found)

    see("function", f"app:{handler}")
    while work:
        module, node = work.pop()
        called = {id(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
                for found in _resolve(module, child.id):
                    see(*found)
            elif isinstance(child, ast.Attribute):
                base = child.value
                resolved = _resolve(module, base.id) if isinstance(base, ast.Name) else []
                for kind, key in resolved:
                    see(kind, key, child.attr)
                if not resolved:
                    # `x.backend` (a config field) is not `Runtime.backend(...)`: a method
                    # runs when called; a property when read.
                    add_method_name(child.attr, called=id(child) in called)
    return reached


def _is_property(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any((d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute)
                else "") in ("property", "cached_property") for d in decorators)


def scan_node(module: str, node: ast.AST) -> list[CallSite]:
    """The AWS client calls in one function (and the functions nested in it)."""
    relative = code_index()[module].path.relative_to(REPO).as_posix()
    name = getattr(node, "name", "<module>")
    return [site for child in ast.walk(node) if (site := call_site(child, relative, name))]


# ------------------------------------------------------------ functions --

ROUTE_FUNCTION = "api_handler"  # Chalice serves every route from one function


@cache
def lambda_functions() -> dict[str, tuple[tuple[str, ...], frozenset[str]]]:
    """Chalice function name -> (the app.py handlers it runs, their decorator kinds)."""
    tree = ast.parse((REPO / "app.py").read_text(encoding="utf-8"))
    handlers: dict[str, list[str]] = {}
    kinds: dict[str, set[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = {d.func.attr for d in node.decorator_list
                      if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)}
        if not decorators:
            continue
        name = ROUTE_FUNCTION if "route" in decorators else node.name
        handlers.setdefault(name, []).append(node.name)
        kinds.setdefault(name, set()).update(decorators)
    return {name: (tuple(handlers[name]), frozenset(kinds[name])) for name in handlers}


def required_actions(function: str | None = None) -> dict[str, list[str]]:
    """IAM action -> the call sites that need it, for one Lambda function (None: all)."""
    names = [function] if function else list(lambda_functions())
    needed: dict[str, list[str]] = {a: ["Lambda logging"] for a in ALWAYS}
    for name in names:
        handlers, kinds = lambda_functions()[name]
        for kind in sorted(kinds):
            for action in EVENT_SOURCE_ACTIONS.get(kind, ()):
                needed.setdefault(action, []).append(f"app.py {kind}")
        for handler in handlers:
            for module, node in reachable_code(handler):
                for site in scan_node(module, node):
                    if (site.path, site.function) in NOT_IN_LAMBDA:
                        continue
                    for action in actions_for(site):
                        needed.setdefault(action, []).append(f"{site.path}:{site.line}")
    return needed


def policy_file(stage: str, function: str) -> Path:
    return REPO / ".chalice" / f"policy-{stage}-{function.replace('_', '-')}.json"


def load_policy(stage: str, function: str) -> dict[str, Any]:
    return json.loads(policy_file(stage, function).read_text(encoding="utf-8"))


def all_policies(stage: str) -> dict[str, dict[str, Any]]:
    return {function: load_policy(stage, function) for function in lambda_functions()}


def policy_actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] for a in as_list(s["Action"])}


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


def test_the_call_graph_follows_modules_classes_and_methods(tmp_path) -> None:
    # Facts of this code base the scan must see, in each direction.
    ingest = required_actions("ingest_telemetry")
    assert "s3:PutObject" in ingest
    release = required_actions("release_approved_model")
    assert {"kms:Sign", "iot:CreateJob", "iam:PassRole", "iot:CancelJob"} <= set(release)
    api = required_actions(ROUTE_FUNCTION)
    assert {"sagemaker:CreateTrainingJob", "iot:ListJobExecutionsForJob"} <= set(api)
    assert "kms:Sign" not in api  # a rollback is released by the packaging function
    assert set(lambda_functions()[ROUTE_FUNCTION][0]) >= {"http_list_models", "http_promote"}


def test_the_code_makes_aws_calls_to_check() -> None:
    # Not vacuous: the pipeline's code does call AWS (ingest writes to S3 at least).
    assert "s3:PutObject" in required_actions()


def test_the_ingest_function_cannot_train_pass_roles_release_or_sign() -> None:
    # It parses untrusted device payloads: it may only consume its queue and write data.
    for stage in STAGES:
        actions = policy_actions(load_policy(stage, "ingest_telemetry"))
        assert actions == {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                           "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                           "s3:PutObject"}, stage
        policy = load_policy(stage, "ingest_telemetry")
        bucket = f"arn:aws:s3:::mledge-{stage}-data-{ACCOUNT}"
        assert allows(policy, "s3:PutObject", f"{bucket}/quarantine/x/y.jsonl.gz")
        assert not allows(policy, "s3:PutObject", f"{bucket}/releases/m/v00001/manifest.json")
        assert not allows(policy, "sqs:ReceiveMessage",
                          f"arn:aws:sqs:us-east-1:{ACCOUNT}:mledge-{stage}-raw-events")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("function", sorted(lambda_functions()))
def test_each_function_policy_holds_exactly_what_its_code_calls(stage, function) -> None:
    policy = load_policy(stage, function)
    needed = required_actions(function)
    missing = {a: where for a, where in needed.items() if not allows(policy, a)}
    assert not missing, f"{policy_file(stage, function).name} lacks: {json.dumps(missing, indent=1)}"
    extra = policy_actions(policy) - set(needed)
    assert not extra, f"{policy_file(stage, function).name} allows what its code never calls: {extra}"


def test_there_is_a_policy_for_every_function_and_no_stray_policy() -> None:
    expected = {policy_file(stage, f).name for stage in STAGES for f in lambda_functions()}
    present = {p.name for p in (REPO / ".chalice").glob("policy-*.json")}
    assert present == expected
    assert len(lambda_functions()) >= 8


@pytest.mark.parametrize("stage", STAGES)
def test_policy_has_no_wildcard_actions_or_resources(stage) -> None:
    for function, policy in all_policies(stage).items():
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            assert "NotAction" not in statement and "NotResource" not in statement
            for action in as_list(statement["Action"]):
                assert "*" not in action, f"{function} {statement['Sid']}: {action}"
            for resource in as_list(statement["Resource"]):
                assert resource != "*", (function, statement["Sid"])
                assert not resource.endswith(":*:*"), (function, statement["Sid"])


@pytest.mark.parametrize("stage", STAGES)
def test_policy_is_scoped_to_the_stage(stage) -> None:
    policies = all_policies(stage)
    other = next(s for s in STAGES if s != stage)
    bucket = f"arn:aws:s3:::mledge-{stage}-data-{ACCOUNT}"
    region = "us-east-1"
    grants = [
        ("ingest_telemetry", "s3:PutObject",
         f"{bucket}/raw/vibration-anomaly/dt=2024-01-01/hour=00/b.jsonl.gz"),
        ("release_approved_model", "s3:GetObject", f"{bucket}/releases/digits/v00001/model.onnx"),
        ("retrain_on_schedule", "s3:ListBucket", bucket),
        ("on_raw_objects_created", "dynamodb:UpdateItem",
         f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/mledge-{stage}-state"),
        ("on_sagemaker_training_state", "dynamodb:PutItem",
         f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/mledge-{stage}-registry"),
        ("ingest_telemetry", "sqs:ReceiveMessage",
         f"arn:aws:sqs:{region}:{ACCOUNT}:mledge-{stage}-telemetry"),
        ("on_raw_objects_created", "sqs:DeleteMessage",
         f"arn:aws:sqs:{region}:{ACCOUNT}:mledge-{stage}-raw-events"),
        ("retrain_on_schedule", "batch:SubmitJob",
         f"arn:aws:batch:{region}:{ACCOUNT}:job-queue/mledge-{stage}-gpu"),
        ("api_handler", "batch:SubmitJob",
         f"arn:aws:batch:{region}:{ACCOUNT}:job-definition/mledge-{stage}-training:3"),
        ("api_handler", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/mledge-{stage}-training"),
        ("release_approved_model", "iam:PassRole",
         f"arn:aws:iam::{ACCOUNT}:role/mledge-{stage}-iot-jobs-presign"),
        ("release_approved_model", "kms:Sign",
         f"arn:aws:kms:{region}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
    ]
    for function, action, resource in grants:
        assert allows(policies[function], action, resource), (function, action, resource)
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
    for function, policy in policies.items():
        for action, resource in denied:
            assert not allows(policy, action, resource), (function, action, resource)


@pytest.mark.parametrize("stage", STAGES)
def test_signing_is_limited_to_the_stage_release_key_alias(stage) -> None:
    for function, policy in all_policies(stage).items():
        signing = [s for s in policy["Statement"] if "kms:Sign" in as_list(s["Action"])]
        if function != "release_approved_model":
            assert not signing, function
            continue
        (statement,) = signing
        assert statement["Condition"] == {"ForAnyValue:StringEquals": {
            "kms:ResourceAliases": f"alias/mledge-{stage}-release-signing"}}


@pytest.mark.parametrize("stage", STAGES)
def test_pass_role_goes_only_to_the_training_and_presign_roles(stage) -> None:
    targets = set()
    for policy in all_policies(stage).values():
        passes = [s for s in policy["Statement"] if "iam:PassRole" in as_list(s["Action"])]
        targets |= {
            (resource, statement["Condition"]["StringEquals"]["iam:PassedToService"])
            for statement in passes for resource in as_list(statement["Resource"])
        }
        for statement in passes:
            assert as_list(statement["Action"]) == ["iam:PassRole"]
    assert targets == {
        (f"arn:aws:iam::*:role/mledge-{stage}-training", "sagemaker.amazonaws.com"),
        (f"arn:aws:iam::*:role/mledge-{stage}-iot-jobs-presign", "iot.amazonaws.com"),
    }


def test_stage_policies_differ_only_in_the_stage() -> None:
    for function in lambda_functions():
        dev = json.dumps(load_policy("dev", function))
        # Glue database names take no '-' (Athena): mledge_<stage>_data.
        assert json.loads(dev.replace("-dev-", "-prod-").replace("_dev_", "_prod_")) == \
            load_policy("prod", function)


def test_chalice_config_points_each_function_at_its_policy() -> None:
    config = json.loads((REPO / ".chalice" / "config.json").read_text())
    assert config["autogen_policy"] is False
    for stage in STAGES:
        assert "iam_policy_file" not in config["stages"][stage]  # no shared role
        functions = config["stages"][stage]["lambda_functions"]
        assert {name: f["iam_policy_file"] for name, f in functions.items()} == {
            name: policy_file(stage, name).name for name in lambda_functions()}
