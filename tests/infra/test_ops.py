"""`mledge stack-config` and `mledge provision-device` against moto in-process."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from mledge_update.signing import ReleaseVerifier
from moto import mock_aws

from chalicelib.signing import create_signing_key, release_public_key_pem
from mledge_ops.cli import main
from mledge_ops.common import device_policy_name, signing_key_alias
from mledge_ops.stack_config import OUTPUT_FOR_VARIABLE
from tests.conftest import REPO, subprocess_env
from tests.infra.support import PIPELINE_TEMPLATE, deploy_stacks, load_template

REGION = "us-east-1"
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS")


@pytest.fixture
def moto() -> Iterator[None]:
    with mock_aws():
        yield


@pytest.fixture
def chalice_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    shutil.copyfile(REPO / ".chalice" / "config.json", path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------ stack-config --


def test_stack_config_copies_outputs_and_keeps_everything_else(moto, chalice_config, capsys):
    outputs = deploy_stacks("dev")
    before = read_json(chalice_config)
    assert main(["stack-config", "--stage", "dev", "--region", REGION,
                 "--chalice-config", str(chalice_config)]) == 0
    after = read_json(chalice_config)

    merged = outputs["mledge-dev-pipeline"] | outputs["mledge-dev-training"]
    variables = after["stages"]["dev"]["environment_variables"]
    for variable, key in OUTPUT_FOR_VARIABLE.items():
        assert variables[variable] == merged[key], variable
    assert variables["MLEDGE_BUCKET"] == "mledge-dev-data-123456789012"
    assert variables["MLEDGE_BATCH_JOB_QUEUE"] == "mledge-dev-gpu"
    # Everything that is not a stack output is untouched, the prod stage included.
    for variable in set(before["stages"]["dev"]["environment_variables"]) - set(OUTPUT_FOR_VARIABLE):
        assert variables[variable] == before["stages"]["dev"]["environment_variables"][variable]
    assert after["stages"]["prod"] == before["stages"]["prod"]
    assert {k: v for k, v in after.items() if k != "stages"} == {
        k: v for k, v in before.items() if k != "stages"
    }
    assert "set MLEDGE_BUCKET: mledge-dev-data -> mledge-dev-data-123456789012" in capsys.readouterr().out

    # A second run changes nothing.
    text = chalice_config.read_text()
    assert main(["stack-config", "--stage", "dev", "--region", REGION,
                 "--chalice-config", str(chalice_config)]) == 0
    assert chalice_config.read_text() == text
    # every stack output plus MLEDGE_STAGE
    assert f"0 changed, {len(OUTPUT_FOR_VARIABLE) + 1} unchanged" in capsys.readouterr().out


def test_stack_config_dry_run_writes_nothing(moto, chalice_config, capsys):
    deploy_stacks("dev")
    text = chalice_config.read_text()
    assert main(["stack-config", "--stage", "dev", "--region", REGION, "--dry-run",
                 "--chalice-config", str(chalice_config)]) == 0
    assert chalice_config.read_text() == text
    assert "would set MLEDGE_BUCKET: mledge-dev-data -> mledge-dev-data-123456789012" in (
        capsys.readouterr().out
    )


def test_stack_config_refuses_missing_outputs_unless_partial(moto, chalice_config, capsys):
    deploy_stacks("dev")
    text = chalice_config.read_text()
    args = ["stack-config", "--stage", "dev", "--region", REGION,
            "--chalice-config", str(chalice_config), "--stack", "mledge-dev-pipeline"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "MLEDGE_TRAINING_ROLE_ARN (output TrainingRoleArn)" in error
    assert chalice_config.read_text() == text

    assert main([*args, "--partial"]) == 0
    variables = read_json(chalice_config)["stages"]["dev"]["environment_variables"]
    assert variables["MLEDGE_BUCKET"] == "mledge-dev-data-123456789012"
    assert variables["MLEDGE_TRAINING_ROLE_ARN"].endswith(":role/mledge-dev-training")  # as before


def test_stack_config_refuses_another_stages_stack(moto, chalice_config, capsys):
    deploy_stacks("prod")
    assert main(["stack-config", "--stage", "dev", "--region", REGION,
                 "--chalice-config", str(chalice_config),
                 "--stack", "mledge-prod-pipeline", "--stack", "mledge-prod-training"]) == 1
    assert "belongs to stage 'prod', not 'dev'" in capsys.readouterr().err


def test_stack_config_names_a_missing_stack(moto, chalice_config, capsys):
    assert main(["stack-config", "--stage", "dev", "--region", REGION,
                 "--chalice-config", str(chalice_config)]) == 1
    assert "stack 'mledge-dev-pipeline' not found" in capsys.readouterr().err


def test_console_entry_point_runs_the_dispatcher():
    done = subprocess.run(
        [sys.executable, "-m", "mledge_ops", "--help"], cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert "stack-config" in done.stdout and "provision-device" in done.stdout


# -------------------------------------------------------- provision-device --


@pytest.fixture
def iot(moto):
    """moto with what infra/pipeline.yaml makes for devices: the policy and the release key.

    (test_infra_deploy.py checks the stack creates both under these names; thing groups
    are the code's: provision-device creates a model's group when it has none.)
    """
    client = boto3.client("iot", region_name=REGION)
    document = load_template(PIPELINE_TEMPLATE)["Resources"]["DevicePolicy"]["Properties"][
        "PolicyDocument"
    ]
    client.create_policy(policyName=device_policy_name("dev"), policyDocument=json.dumps(document))
    create_signing_key(boto3.client("kms", region_name=REGION), signing_key_alias("dev"))
    return client


def provision(out: Path, thing: str = "pump-7", model: str = "vibration-anomaly", *extra: str):
    return main(["provision-device", "--stage", "dev", "--thing", thing, "--model", model, "--out", str(out),
                 "--region", REGION, *extra])


def test_provision_registers_the_device_and_writes_its_bundle(iot, tmp_path):
    out = tmp_path / "pump-7"
    assert provision(out) == 0

    record = read_json(out / "provision.json")
    thing = iot.describe_thing(thingName="pump-7")
    assert thing["attributes"] == {"model": "vibration-anomaly", "stage": "dev"}
    principals = iot.list_thing_principals(thingName="pump-7")["principals"]
    assert principals == [record["certificate_arn"]]
    policies = iot.list_attached_policies(target=record["certificate_arn"])["policies"]
    assert [p["policyName"] for p in policies] == ["mledge-dev-device"]
    members = iot.list_things_in_thing_group(thingGroupName="mledge-vibration")["things"]
    assert members == ["pump-7"]
    certificate = iot.describe_certificate(certificateId=record["certificate_id"])
    assert certificate["certificateDescription"]["status"] == "ACTIVE"
    assert (out / "cert.pem").read_text() == certificate["certificateDescription"]["certificatePem"]

    key = out / "private.key"
    assert "PRIVATE KEY" in key.read_text()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "amazontrust.com" in (out / "AmazonRootCA1.README.txt").read_text()
    agent = read_json(out / "agent.json")
    # moto makes up a new ATS endpoint on every call; AWS returns the account's one
    assert re.fullmatch(r"[a-z0-9]+-ats\.iot\.us-east-1\.amazonaws\.com", agent.pop("endpoint"))
    assert agent == {
        "thing": "pump-7",
        "model": "vibration-anomaly",
        "port": 8883,
        "cert": str(out / "cert.pem"),
        "key": str(out / "private.key"),
        "ca": str(out / "AmazonRootCA1.pem"),
        "state_dir": str(out / "state"),
        "sensor": "vibration",
        "release_keys": str(out / "release-keys.pem"),
    }


def test_agent_json_is_accepted_by_the_agent_config_if_present(iot, tmp_path):
    agent_config = pytest.importorskip("mledge_edge.config")
    assert provision(tmp_path / "d", "cam-1", "digits", "--device-dir", "/etc/mledge") == 0
    config = agent_config.AgentConfig.from_file(tmp_path / "d" / "agent.json").validate()
    assert (config.thing, config.model, config.port) == ("cam-1", "digits", 8883)
    assert config.cert == "/etc/mledge/cert.pem"
    assert config.release_keys == "/etc/mledge/release-keys.pem"


def test_provision_is_idempotent_for_the_same_thing_and_bundle(iot, tmp_path):
    out = tmp_path / "pump-7"
    assert provision(out) == 0
    first = read_json(out / "provision.json")
    key = (out / "private.key").read_text()
    assert provision(out) == 0
    assert read_json(out / "provision.json")["certificate_id"] == first["certificate_id"]
    assert (out / "private.key").read_text() == key
    assert len(iot.list_certificates()["certificates"]) == 1
    assert iot.list_thing_principals(thingName="pump-7")["principals"] == [first["certificate_arn"]]
    assert iot.list_things_in_thing_group(thingGroupName="mledge-vibration")["things"] == ["pump-7"]


def test_provision_replaces_a_certificate_that_is_no_longer_active(iot, tmp_path):
    out = tmp_path / "pump-7"
    assert provision(out) == 0
    first = read_json(out / "provision.json")
    iot.update_certificate(certificateId=first["certificate_id"], newStatus="INACTIVE")
    assert provision(out) == 0
    second = read_json(out / "provision.json")
    assert second["certificate_id"] != first["certificate_id"]
    assert second["certificate_arn"] in iot.list_thing_principals(thingName="pump-7")["principals"]


def test_provision_unknown_model_lists_the_known_ones(iot, tmp_path, capsys):
    assert provision(tmp_path / "x", "pump-8", "turbine") == 1
    error = capsys.readouterr().err
    assert "unknown model 'turbine'" in error
    assert "digits, vibration-anomaly" in error
    assert not (tmp_path / "x").exists()
    assert iot.list_things()["things"] == []


def test_provision_refuses_a_thing_of_another_model(iot, tmp_path, capsys):
    assert provision(tmp_path / "a") == 0
    assert provision(tmp_path / "b", "pump-7", "digits") == 1
    assert "already exists for model 'vibration-anomaly', not 'digits'" in capsys.readouterr().err


def test_provision_refuses_to_overwrite_another_things_bundle(iot, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert provision(out, "pump-1") == 0
    assert provision(out, "pump-2") == 1
    assert "holds the bundle of thing 'pump-1'" in capsys.readouterr().err
    assert read_json(out / "agent.json")["thing"] == "pump-1"
    assert provision(out, "pump-2", "vibration-anomaly", "--force") == 0
    assert read_json(out / "agent.json")["thing"] == "pump-2"


def test_provision_explains_missing_infrastructure(moto, tmp_path, capsys):
    assert provision(tmp_path / "x") == 1
    error = capsys.readouterr().err
    assert "IoT policy 'mledge-dev-device' does not exist" in error
    assert "infra/pipeline.yaml" in error


def test_provision_without_the_release_key_is_refused_before_any_thing_is_made(
        moto, tmp_path, capsys):
    client = boto3.client("iot", region_name=REGION)
    client.create_policy(policyName=device_policy_name("dev"), policyDocument="{}")
    assert provision(tmp_path / "x") == 1
    error = capsys.readouterr().err
    assert "alias/mledge-dev-release-signing" in error and "infra/pipeline.yaml" in error
    assert client.list_things()["things"] == []
    assert not (tmp_path / "x").exists()


def test_provision_writes_the_stage_release_key_and_creates_the_model_group(iot, tmp_path):
    kms = boto3.client("kms", region_name=REGION)
    assert provision(tmp_path / "d") == 0
    pem = (tmp_path / "d" / "release-keys.pem").read_bytes()
    assert pem == release_public_key_pem(kms, signing_key_alias("dev"))
    ReleaseVerifier.from_pem(pem)  # what the agent loads
    group = iot.describe_thing_group(thingGroupName="mledge-vibration")
    assert group["thingGroupProperties"]["attributePayload"]["attributes"] == {
        "model": "vibration-anomaly", "stage": "dev"}
    assert read_json(tmp_path / "d" / "provision.json")["signing_key"] == signing_key_alias("dev")


def test_provision_copies_a_given_root_ca(iot, tmp_path):
    ca = tmp_path / "root.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert provision(tmp_path / "d", "pump-3", "vibration-anomaly", "--ca-file", str(ca)) == 0
    assert (tmp_path / "d" / "AmazonRootCA1.pem").read_text() == ca.read_text()
