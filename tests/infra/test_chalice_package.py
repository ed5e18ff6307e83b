"""`chalice package` of each stage works and its template passes cfn-lint.

Chalice builds the Lambda bundle (it downloads Lambda wheels for
requirements.txt the first time, then reuses .chalice/deployments/), so this is
marked slow; it still runs in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, subprocess_env
from tests.infra.support import lint
from tests.infra.test_policy import policy_file

pytestmark = pytest.mark.slow
CHALICE = "import sys; from chalice.cli import main; sys.argv[0] = 'chalice'; sys.exit(main())"


@pytest.fixture(scope="module", params=["dev", "prod"])
def packaged(request, tmp_path_factory) -> tuple[str, Path, dict[str, Any]]:
    stage = request.param
    out = tmp_path_factory.mktemp(f"chalice-{stage}")
    # The child must see only what chalice sets from the stage, not the tests' variables.
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MLEDGE_")}
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    done = subprocess.run(
        [sys.executable, "-c", CHALICE, "package", "--stage", stage, str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    template = json.loads((out / "sam.json").read_text())
    return stage, out, template


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items()
            if v["Type"] == "AWS::Serverless::Function"}


def test_packaged_template_passes_cfn_lint(packaged) -> None:
    _, out, _ = packaged
    assert lint(out / "sam.json") == []
    assert (out / "deployment.zip").stat().st_size > 0


def test_every_function_runs_with_its_own_role_and_policy(packaged) -> None:
    stage, _, template = packaged
    assert functions(template), "app.py defines no handlers"
    roles = set()
    for name, function in functions(template).items():
        handler = function["Properties"]["Handler"].rsplit(".", 1)[1]
        chalice_name = "api_handler" if handler == "app" else handler
        policy = json.loads(policy_file(stage, chalice_name).read_text())
        role = function["Properties"]["Role"]["Fn::GetAtt"][0]
        roles.add(role)
        documents = [p["PolicyDocument"] for p in
                     template["Resources"][role]["Properties"]["Policies"]]
        assert documents == [policy], name
        variables = function["Properties"]["Environment"]["Variables"]
        assert variables["MLEDGE_STAGE"] == stage
    assert len(roles) == len(functions(template))  # no two functions share a role


def test_sqs_event_sources_are_the_stage_queues(packaged) -> None:
    stage, _, template = packaged
    consumable = {
        resource.rsplit(":", 1)[1]
        for path in (REPO / ".chalice").glob(f"policy-{stage}-*.json")
        for statement in json.loads(path.read_text())["Statement"]
        if "sqs:ReceiveMessage" in statement["Action"]
        for resource in statement["Resource"]
    }
    queues = [
        event["Properties"]["Queue"]["Fn::Sub"].rsplit(":", 1)[1]
        for function in functions(template).values()
        for event in function["Properties"].get("Events", {}).values()
        if event["Type"] == "SQS"
    ]
    assert queues, "no SQS handler (ingest consumes the telemetry queue)"
    assert set(queues) <= consumable
    assert all(q.startswith(f"mledge-{stage}-") for q in queues)


def test_the_package_left_no_stray_files_in_the_repository() -> None:
    # .chalice/deployments/ is the only thing chalice writes here, and it is ignored.
    status = subprocess.run(["git", "status", "--porcelain", "--", ".chalice"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=30,
                            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    assert not [line for line in status.stdout.splitlines() if "deployments" in line]


def test_bundle_holds_exactly_the_locked_lambda_requirements(packaged) -> None:
    """The zip chalice builds carries requirements.txt's pinned versions, nothing floats."""
    import zipfile

    from tests.infra.test_lock import entries

    _, out, _ = packaged
    with zipfile.ZipFile(out / "deployment.zip") as bundle:
        metadata = [n for n in bundle.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        bundled = {}
        for name in metadata:
            fields = dict(line.split(": ", 1) for line in bundle.read(name).decode().splitlines()
                          if ": " in line and not line.startswith(" "))
            bundled[re.sub(r"[-_.]+", "-", fields["Name"]).lower()] = fields["Version"]
    locked = {name: version for name, (version, _) in entries(REPO / "requirements.txt").items()}
    assert bundled == locked
