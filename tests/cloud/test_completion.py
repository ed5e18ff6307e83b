"""Training completion events through the real Chalice handlers (chalice.test.Client + moto)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from chalice.test import Client

from chalicelib.completion import (
    CompletionHandler,
    identify_job,
    parse_batch_event,
    parse_sagemaker_event,
)
from chalicelib.registry import Registry, Status, VersionRecord
from tests.cloud.support import (
    ONNX_BYTES,
    batch_event_detail,
    metrics_doc,
    put_artifact,
    received_details,
    released_version_with,
    sagemaker_event_detail,
    start_version,
)

VIB = "vibration-anomaly"
DIGITS = "digits"


def _sagemaker(client: Client, detail: dict[str, Any], *, local: bool = False) -> None:
    source = "mledge.local-training" if local else "aws.sagemaker"
    event = client.events.generate_cw_event(
        source=source, detail_type="SageMaker Training Job State Change", detail=detail,
        resources=[], region="us-east-1")
    name = "on_local_training_state" if local else "on_sagemaker_training_state"
    client.lambda_.invoke(name, event)


def _batch(client: Client, detail: dict[str, Any]) -> None:
    event = client.events.generate_cw_event(
        source="aws.batch", detail_type="Batch Job State Change", detail=detail, resources=[],
        region="us-east-1")
    client.lambda_.invoke("on_batch_training_state", event)


def test_completed_job_that_passes_the_gate_is_approved_and_announced(
        client, aws, settings, registry, state_store, approved_queue):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))

    record = registry.get(VIB, version)
    assert record.status is Status.APPROVED
    assert record.gate["approved"] is True
    assert "silhouette 0.5200 ≥ threshold 0.3000: pass" in record.gate["reasons"]
    assert record.metrics["challenger"]["silhouette"] == 0.52
    assert record.artifact == artifact
    # the approval keeps the lock until packaging has released it (packaging tests)
    assert state_store.training_lock(VIB).version == 1
    assert received_details(aws, approved_queue) == [
        {"model": VIB, "version": version, "artifact": artifact, "manual": False}]


def test_completed_job_below_threshold_is_rejected_with_reasons(
        client, aws, settings, registry, state_store, approved_queue):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.12))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))

    record = registry.get(VIB, version)
    assert record.status is Status.REJECTED
    assert "silhouette 0.1200 < threshold 0.3000: FAIL" in record.gate["reasons"]
    assert state_store.training_lock(VIB) is None
    assert received_details(aws, approved_queue) == []


def test_challenger_not_better_than_the_released_champion_is_rejected(
        client, aws, settings, registry, state_store, approved_queue):
    released_version_with(registry, state_store, DIGITS, aws, settings.bucket, 0.95)
    version, name = start_version(registry, state_store, DIGITS, backend="batch")
    put_artifact(aws, settings.bucket, DIGITS, name,
                 metrics_doc(family="classifier", metric="accuracy", challenger=0.952,
                             champion=0.95, train=800))
    _batch(client, batch_event_detail(name, "SUCCEEDED"))

    record = registry.get(DIGITS, version)
    assert record.status is Status.REJECTED
    assert any("< champion 0.9500 + min_improvement 0.0050" in r
               for r in record.gate["reasons"])
    assert record.artifact == f"s3://{settings.bucket}/models/{DIGITS}/{name}/output/model.tar.gz"
    assert received_details(aws, approved_queue) == []


def test_challenger_scored_against_a_release_the_fleet_left_is_rejected(
        client, aws, settings, registry, state_store, approved_queue):
    first = released_version_with(registry, state_store, VIB, aws, settings.bucket, 0.4)
    version, name = start_version(registry, state_store, VIB)  # scored against `first`
    _set_champion(aws, settings, version, first)
    # Meanwhile another version, approved before this training started, is released.
    newer = registry.allocate_version(VIB)
    registry.create_training(VIB, newer, {"job_name": f"mledge-{VIB}-v{newer}-x"})
    registry.transition(VIB, newer, Status.APPROVED, expected=[Status.TRAINING], reason="test")
    registry.mark_released(VIB, newer, {"job_id": f"{VIB}-v{newer}"})
    artifact = put_artifact(aws, settings.bucket, VIB, name,
                            metrics_doc(challenger=0.9, champion=0.4))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))

    record = registry.get(VIB, version)
    assert record.status is Status.REJECTED
    assert (f"champion scored was v{first}, but the fleet now runs v{newer}: the challenger "
            "was never compared to it: FAIL") in record.gate["reasons"]
    assert received_details(aws, approved_queue) == []


def _set_champion(aws: Any, settings: Any, version: int, champion: int) -> None:
    """The trigger records the release it scored against in the lineage."""
    aws.dynamodb.update_item(
        TableName=settings.registry_table,
        Key={"model": {"S": VIB}, "version": {"N": str(version)}},
        UpdateExpression="SET lineage.champion_version = :c",
        ExpressionAttributeValues={":c": {"N": str(champion)}})


def test_local_backend_events_use_the_sagemaker_shape(client, aws, settings, registry, state_store,
                                                      approved_queue):
    version, name = start_version(registry, state_store, VIB, backend="local")
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.6))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact), local=True)
    assert registry.get(VIB, version).status is Status.APPROVED
    assert [d["version"] for d in received_details(aws, approved_queue)] == [version]


def test_failed_sagemaker_job_is_recorded_with_its_reason_and_frees_the_lock(
        client, registry, state_store):
    version, name = start_version(registry, state_store, VIB)
    _sagemaker(client, sagemaker_event_detail(
        name, "Failed", failure="AlgorithmError: too few records (12 < 50)"))
    record = registry.get(VIB, version)
    assert record.status is Status.FAILED
    assert record.failure_reason == "AlgorithmError: too few records (12 < 50)"
    assert state_store.training_lock(VIB) is None


def test_stopped_sagemaker_job_is_failed(client, registry, state_store):
    version, name = start_version(registry, state_store, VIB)
    _sagemaker(client, sagemaker_event_detail(name, "Stopped"))
    assert registry.get(VIB, version).failure_reason == "training job was stopped"


def test_failed_batch_job_reason_includes_container_reason_and_exit_code(client, registry, state_store):
    version, name = start_version(registry, state_store, DIGITS, backend="batch")
    _batch(client, batch_event_detail(name, "FAILED", reason="Essential container in task exited",
                                      exit_code=137))
    record = registry.get(DIGITS, version)
    assert record.status is Status.FAILED
    assert record.failure_reason == ("Essential container in task exited; OutOfMemoryError: "
                                     "Container killed; exit code 137")
    assert state_store.training_lock(DIGITS) is None


@pytest.mark.parametrize("status", ["InProgress", "Stopping"])
def test_intermediate_sagemaker_states_change_nothing(client, registry, state_store, status):
    version, name = start_version(registry, state_store, VIB)
    _sagemaker(client, sagemaker_event_detail(name, status))
    assert registry.get(VIB, version).status is Status.TRAINING
    assert state_store.training_lock(VIB).version == version


@pytest.mark.parametrize("status", ["SUBMITTED", "RUNNABLE", "STARTING", "RUNNING"])
def test_intermediate_batch_states_change_nothing(client, registry, state_store, status):
    version, name = start_version(registry, state_store, DIGITS, backend="batch")
    _batch(client, batch_event_detail(name, status))
    assert registry.get(DIGITS, version).status is Status.TRAINING
    assert state_store.training_lock(DIGITS).version == version


def test_duplicate_completion_event_does_nothing(client, aws, settings, registry, state_store,
                                                 approved_queue):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    detail = sagemaker_event_detail(name, "Completed", artifact=artifact)
    _sagemaker(client, detail)
    before = registry.get(VIB, version)
    # packaging released it and the next training has taken the lock meanwhile: a late
    # duplicate must not free it
    assert state_store.release_training_lock(VIB, version)
    next_version, _ = start_version(registry, state_store, VIB)
    _sagemaker(client, detail)
    _sagemaker(client, detail)

    after = registry.get(VIB, version)
    assert after.status is Status.APPROVED
    assert after.history == before.history
    assert len(received_details(aws, approved_queue)) == 1
    assert state_store.training_lock(VIB).version == next_version


class _StaleFirstRead(Registry):
    """A registry whose first get() returns what it read before the other handler wrote."""

    def __init__(self, registry: Registry, stale: VersionRecord) -> None:
        super().__init__(registry.table, registry.dynamodb)
        self.stale: VersionRecord | None = stale

    def get(self, model: str, version: int) -> VersionRecord:
        if self.stale is not None:
            record, self.stale = self.stale, None
            return record
        return super().get(model, version)


def test_two_handlers_racing_on_one_completion_record_and_announce_once(
        aws, settings, config, registry, state_store, approved_queue):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    event = {"detail": sagemaker_event_detail(name, "Completed", artifact=artifact)}
    change = parse_sagemaker_event(event, set(config.models))
    seen_by_both = registry.get(VIB, version)  # both deliveries read TRAINING

    def handler(reg: Registry) -> CompletionHandler:
        return CompletionHandler(registry=reg, state=state_store, s3=aws.s3, events=aws.events,
                                 settings=settings, config=config)

    first = handler(registry).handle(change)
    second = handler(_StaleFirstRead(registry, seen_by_both)).handle(change)
    assert (first.outcome, second.outcome) == ("approved", "duplicate")
    record = registry.get(VIB, version)
    assert record.status is Status.APPROVED
    assert [h["to"] for h in record.history] == ["TRAINING", "APPROVED"]
    assert len(received_details(aws, approved_queue)) == 1


def test_a_failure_event_after_approval_does_not_undo_it(client, aws, settings, registry, state_store):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))
    _sagemaker(client, sagemaker_event_detail(name, "Failed", failure="late"))
    assert registry.get(VIB, version).status is Status.APPROVED


def test_missing_artifact_fails_the_version(client, settings, registry, state_store):
    version, name = start_version(registry, state_store, VIB)
    artifact = f"s3://{settings.bucket}/models/{VIB}/{name}/output/model.tar.gz"
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))
    record = registry.get(VIB, version)
    assert record.status is Status.FAILED
    assert record.failure_reason == f"model artifact {artifact} not found"
    assert state_store.training_lock(VIB) is None


@pytest.mark.parametrize(("members", "raw", "reason"), [
    (None, b"this is not a tarball", "is not a readable tar.gz"),
    ({"model.onnx": ONNX_BYTES}, None, "has no metrics.json"),
    ({"metrics.json": json.dumps(metrics_doc()).encode()}, None, "has no model.onnx"),
    ({"model.onnx": ONNX_BYTES, "metrics.json": b"{not json"}, None, "is not valid JSON"),
    ({"model.onnx": ONNX_BYTES, "metrics.json": b"[1, 2]"}, None, "is not a JSON object"),
    ({"model.onnx": b"truncated", "metrics.json": json.dumps(metrics_doc()).encode()}, None,
     "does not match metrics.json's onnx.sha256"),
])
def test_corrupt_artifact_fails_the_version_with_the_reason(client, aws, settings, registry,
                                                            state_store, members, raw, reason):
    version, name = start_version(registry, state_store, VIB)
    if raw is not None:
        key = f"models/{VIB}/{name}/output/model.tar.gz"
        aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=raw)
        artifact = f"s3://{settings.bucket}/{key}"
    else:
        artifact = put_artifact(aws, settings.bucket, VIB, name, members=members)
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))
    record = registry.get(VIB, version)
    assert record.status is Status.FAILED
    assert reason in record.failure_reason
    assert state_store.training_lock(VIB) is None


def test_a_job_that_is_not_ours_is_ignored(client, registry):
    _sagemaker(client, sagemaker_event_detail("someone-elses-job", "Completed"))
    assert registry.list_versions(VIB) == []


def test_unknown_version_frees_a_lock_it_holds(client, state_store):
    assert state_store.acquire_training_lock(VIB, 7, "mledge-vibration-anomaly-v7-x")
    _sagemaker(client, sagemaker_event_detail("mledge-vibration-anomaly-v7-x", "Failed",
                                              failure="boom"))
    assert state_store.training_lock(VIB) is None


def test_failed_announcement_is_retried_by_the_next_delivery(client, aws, settings, registry,
                                                             state_store, approved_queue, monkeypatch):
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    detail = sagemaker_event_detail(name, "Completed", artifact=artifact)
    real_put_events = aws.events.put_events

    def refuse(**kwargs: Any) -> dict[str, Any]:
        return {"FailedEntryCount": 1, "Entries": [{"ErrorCode": "ThrottlingException",
                                                    "ErrorMessage": "slow down"}]}

    monkeypatch.setattr(aws.events, "put_events", refuse)
    with pytest.raises(Exception, match="ThrottlingException"):
        _sagemaker(client, detail)
    assert registry.get(VIB, version).status is Status.APPROVED  # recorded, not announced
    monkeypatch.setattr(aws.events, "put_events", real_put_events)
    _sagemaker(client, detail)  # EventBridge retries the invocation
    _sagemaker(client, detail)
    assert [d["version"] for d in received_details(aws, approved_queue)] == [version]


def test_job_names_and_tags_identify_model_and_version():
    known = {"vibration-anomaly", "a-v2", "digits"}
    assert identify_job("mledge-vibration-anomaly-v12-20260101t000000", None, known) == \
        ("vibration-anomaly", 12)
    # a model name that itself contains "-v<digits>-"
    assert identify_job("mledge-a-v2-v3-abc", None, known) == ("a-v2", 3)
    assert identify_job("other-job", None, known) is None
    assert identify_job("x", {"mledge:model": "digits", "mledge:version": "4"}, known) == \
        ("digits", 4)
    assert identify_job("x", [{"Key": "mledge:model", "Value": "digits"},
                              {"Key": "mledge:version", "Value": "5"}], known) == ("digits", 5)


def test_batch_artifact_location_follows_the_training_output_layout():
    change = parse_batch_event({"detail": batch_event_detail("mledge-digits-v3-x", "SUCCEEDED")},
                               {"digits"}, "bucket")
    assert change.artifact == "s3://bucket/models/digits/mledge-digits-v3-x/output/model.tar.gz"
    assert change.state == "succeeded" and change.version == 3


def _emf(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if '"_aws"' in line]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """What the app's Powertools logger writes, formatted as in Lambda (JSON lines)."""
    from chalicelib.observability import LOGGER

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LOGGER.registered_formatter)
    LOGGER.addHandler(handler)
    yield stream
    LOGGER.removeHandler(handler)


def _logs(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    stream.seek(0)
    stream.truncate()
    return lines


def test_gate_decisions_and_failures_are_metrics_and_logs_carry_model_version_job(
        client, aws, settings, registry, state_store, capsys, log_stream):
    capsys.readouterr()
    approved, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))
    out = capsys.readouterr().out
    per_model = [b for b in _emf(out) if b.get("model") == VIB]
    assert [b.get("GateApproved") for b in per_model] == [[1.0]]
    assert per_model[0]["GateChallengerScore"] == [0.52]
    assert per_model[0]["metric"] == "silhouette" and per_model[0]["version"] == approved
    decision = next(line for line in _logs(log_stream) if "APPROVED" in line["message"])
    assert (decision["level"], decision["model"], decision["version"], decision["job"]) == (
        "INFO", VIB, approved, name)
    state_store.release_training_lock(VIB, approved)  # what packaging does once released

    _, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.12))
    _sagemaker(client, sagemaker_event_detail(name, "Completed", artifact=artifact))
    blobs = _emf(capsys.readouterr().out)
    assert [b["GateRejected"] for b in blobs if "GateRejected" in b] == [[1.0], [1.0]]
    assert {b["stage"] for b in blobs} == {settings.stage}

    _, name = start_version(registry, state_store, VIB)
    _sagemaker(client, sagemaker_event_detail(name, "Failed", failure="AlgorithmError: boom"))
    out = capsys.readouterr().out
    _logs(log_stream)
    assert [b["TrainingsFailed"] for b in _emf(out) if b.get("model") == VIB] == [[1.0]]
    # Keys from one invocation do not leak into the next one's lines.
    _sagemaker(client, sagemaker_event_detail("not-ours-123", "Completed"))
    lines = _logs(log_stream)
    assert any("not an mledge training job" in line["message"] for line in lines)
    assert all("model" not in line for line in lines if "not an mledge" in line["message"])
