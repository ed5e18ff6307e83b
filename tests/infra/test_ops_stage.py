"""`mledge --stage S`: the operator commands read the stage's settings from .chalice/config.json."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from chalicelib.aws import AwsClients
from chalicelib.registry import Registry
from chalicelib.tables import create_tables
from mledge_ops.cli import main
from tests.conftest import REPO

REGION = "us-east-1"


@pytest.fixture
def bare_env(monkeypatch) -> Iterator[None]:
    """No MLEDGE_* variables: what an operator's shell has."""
    for name in list(os.environ):
        if name.startswith("MLEDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield


def stage_variables(stage: str) -> dict[str, str]:
    config = json.loads((REPO / ".chalice" / "config.json").read_text())
    return config["stages"][stage]["environment_variables"]


def seed(stage: str, model: str, versions: int) -> None:
    variables = stage_variables(stage)
    clients = AwsClients(region=REGION)
    create_tables(clients.dynamodb, variables["MLEDGE_REGISTRY_TABLE"],
                  variables["MLEDGE_STATE_TABLE"])
    registry = Registry(variables["MLEDGE_REGISTRY_TABLE"], clients.dynamodb)
    for _ in range(versions):
        version = registry.allocate_version(model)
        registry.create_training(model, version, {"job_name": f"job-{stage}-{version}"})


def versions_of(capsys, *argv: str) -> list[int]:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return [v["version"] for v in json.loads(capsys.readouterr().out)]


def test_each_stage_reads_its_own_registry_with_no_variable_exported(bare_env, capsys) -> None:
    seed("dev", "vibration-anomaly", 1)
    seed("prod", "vibration-anomaly", 3)
    assert sorted(versions_of(capsys, "--stage", "prod", "versions", "vibration-anomaly",
                              "--json")) == [1, 2, 3]
    # The option works after the command too, and the default stage is dev.
    assert len(versions_of(capsys, "versions", "vibration-anomaly", "--stage", "prod",
                           "--json")) == 3
    assert len(versions_of(capsys, "versions", "vibration-anomaly", "--json")) == 1


def test_mledge_stage_variable_picks_the_default_stage(bare_env, capsys, monkeypatch) -> None:
    seed("prod", "digits", 2)
    monkeypatch.setenv("MLEDGE_STAGE", "prod")
    assert len(versions_of(capsys, "versions", "digits", "--json")) == 2


def test_an_unknown_stage_or_config_is_a_clear_error(bare_env, capsys, tmp_path: Path) -> None:
    assert main(["--stage", "qa", "models"]) == 1
    assert "no stage 'qa' (stages: dev, prod)" in capsys.readouterr().err
    assert main(["--chalice-config", str(tmp_path / "none.json"), "--stage", "dev",
                 "models"]) == 1
    assert "none.json not found" in capsys.readouterr().err
    broken = tmp_path / "config.json"
    broken.write_text(json.dumps({"stages": {"dev": {"environment_variables": {}}}}))
    assert main(["--chalice-config", str(broken), "--stage", "dev", "models"]) == 1
    assert "MLEDGE_BUCKET is not set" in capsys.readouterr().err


def test_stack_config_still_needs_an_explicit_stage(bare_env, capsys) -> None:
    assert main(["stack-config", "--dry-run"]) == 1
    assert "--stage dev or --stage prod" in capsys.readouterr().err
