"""docs/configuration.md documents every field chalicelib/config.py accepts, and its example loads."""

from __future__ import annotations

import dataclasses
import re
import tomllib

from chalicelib.config import (
    AbortConfig,
    CanaryConfig,
    DatasetConfig,
    FeatureSchema,
    ModelConfig,
    PackagingConfig,
    RolloutConfig,
    TimeoutConfig,
    TrainingConfig,
    UplinkPolicy,
    parse_pipeline_config,
)
from tests.conftest import REPO

DOC = (REPO / "docs" / "configuration.md").read_text()
NOT_TOML_FIELDS = {"name"}  # the table's key, not a field inside it
SUB_TABLES = {"schema", "training", "hyperparameters", "rollout", "abort", "timeout", "uplink", "packaging",
              "dataset", "canary"}


def test_every_config_field_is_documented() -> None:
    for cls in (ModelConfig, FeatureSchema, TrainingConfig, RolloutConfig, AbortConfig,
                TimeoutConfig, UplinkPolicy, PackagingConfig, DatasetConfig, CanaryConfig):
        for f in dataclasses.fields(cls):
            if f.name in NOT_TOML_FIELDS:
                continue
            if cls is ModelConfig and f.name in SUB_TABLES:
                assert f"`[models.<name>.{f.name}]`" in DOC, f"no section for {f.name}"
                continue
            assert f"`{f.name}`" in DOC, f"docs/configuration.md lacks {cls.__name__}.{f.name}"


def test_add_a_model_example_is_valid() -> None:
    config = parse_pipeline_config(tomllib.loads(_doc_example()))
    assert config.model("bearing-temp").schema.feature_count == 4


def _doc_example() -> str:
    example = re.search(r"```toml\n(.*?)```", DOC, re.S)
    assert example is not None
    return "\n".join(line[3:] if line.startswith("   ") else line
                     for line in example.group(1).splitlines())


def test_the_add_a_model_example_goes_from_config_to_a_release_with_no_template_edit(
        aws, settings, tmp_path, monkeypatch) -> None:
    """The doc's table added to the real pipeline.toml: the model trains, releases to its
    own thing group (created by packaging), and provision-device enrols devices in it."""
    from chalice.test import Client

    from app import app
    from chalicelib.registry import Registry, Status
    from chalicelib.runtime import Runtime, set_runtime
    from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
    from mledge_ops.cli import main
    from tests.cloud.test_packaging import artifact, kmeans_onnx

    config_path = tmp_path / "pipeline.toml"
    config_path.write_text(DEFAULT_PIPELINE_CONFIG.read_text() + "\n" + _doc_example())
    stage = dataclasses.replace(settings, pipeline_config=config_path)
    set_runtime(Runtime.from_settings(stage, clients=aws))
    try:
        registry = Registry(stage.registry_table, aws.dynamodb)
        version = registry.allocate_version("bearing-temp")
        registry.create_training("bearing-temp", version, {"job_name": "j"})
        key = "models/bearing-temp/j/output/model.tar.gz"
        aws.s3.put_object(Bucket=stage.bucket, Key=key, Body=artifact(kmeans_onnx(3)))
        registry.transition("bearing-temp", version, Status.APPROVED, expected=[Status.TRAINING],
                            artifact=f"s3://{stage.bucket}/{key}")
        with Client(app) as client:
            event = client.events.generate_cw_event(
                source="mledge.pipeline", detail_type="ModelApproved",
                detail={"model": "bearing-temp", "version": version}, resources=[])
            result = client.lambda_.invoke("release_approved_model", event).payload
        assert result["outcome"] == "released", result
        group = aws.iot.describe_thing_group(thingGroupName="mledge-bearing")
        job = aws.iot.describe_job(jobId=result["job_id"])["job"]
        assert job["targets"] == [group["thingGroupArn"]]
    finally:
        set_runtime(None)

    aws.iot.create_policy(policyName="mledge-dev-device", policyDocument="{}")
    from chalicelib.signing import create_signing_key

    create_signing_key(aws.kms, "alias/mledge-dev-release-signing")
    assert main(["provision-device", "--stage", "dev", "--thing", "bearing-1", "--model",
                 "bearing-temp", "--out", str(tmp_path / "b"), "--region", "us-east-1",
                 "--pipeline-config", str(config_path)]) == 0
    members = aws.iot.list_things_in_thing_group(thingGroupName="mledge-bearing")["things"]
    assert members == ["bearing-1"]
