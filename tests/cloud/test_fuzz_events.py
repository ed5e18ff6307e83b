"""Cloud events and training artifacts from outside: S3/SQS raw-object events, SageMaker and
Batch state changes, metrics.json, golden.json and ModelApproved details.

Regression tests for inputs that used to raise (metrics DynamoDB cannot store kept a
version in TRAINING with its lock held; a malformed ModelApproved raised), then
hypothesis properties: each parser returns one of its documented outcomes and raises
nothing else.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mledge_update import UpdateFormatError
from mledge_update.document import smoke_from_golden

from chalicelib.completion import (
    ArtifactError,
    CompletionHandler,
    CompletionResult,
    JobStateChange,
    parse_batch_event,
    parse_sagemaker_event,
    read_metrics,
)
from chalicelib.config import load_pipeline_config
from chalicelib.gate import GateDecision, evaluate
from chalicelib.packaging import ModelApproved, PackagingError, handle_model_approved
from chalicelib.registry import Status, UnstorableValueError, check_storable
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from chalicelib.trigger import Trigger, TriggerReport, iter_s3_records
from tests.cloud.support import (
    ONNX_BYTES,
    artifact_bytes,
    metrics_doc,
    put_artifact,
    sagemaker_event_detail,
    start_version,
)
from tests.fuzz_strategies import json_values, nasty_numbers, nasty_text

CONFIG = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)
VIB = "vibration-anomaly"
KNOWN = set(CONFIG.models)


# ------------------------------------------------- metrics DynamoDB cannot store


@pytest.mark.parametrize(("path", "value", "why"), [
    (("model", "inertia"), 1e200, "metrics.model.inertia"),
    (("data", "records"), 10**45, "metrics.data.records"),
    (("model", "tol"), 1e-200, "metrics.model.tol"),
    (("model", "big"), -(10**126), "metrics.model.big"),
    (("model", "deep"), json.loads("[" * 40 + "]" * 40), "nested deeper than 32"),
    (("model", "s"), "\ud800", "not valid Unicode"),
    (("model",), {"": 1}, "empty"),
])
def test_metrics_dynamodb_cannot_store_fail_the_version_and_free_the_lock(
        aws, settings, registry, state_store, path, value, why) -> None:
    version, name = start_version(registry, state_store, VIB)
    metrics = metrics_doc(challenger=0.52)
    target = metrics
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics)
    handler = CompletionHandler.create(clients=aws, settings=settings, config=CONFIG)
    result = handler.handle_sagemaker({"detail": sagemaker_event_detail(name, "Completed",
                                                                        artifact=artifact)})
    assert result.outcome == "failed", result
    record = registry.get(VIB, version)
    assert record.status is Status.FAILED
    assert "cannot be stored in the registry" in record.failure_reason
    assert why in record.failure_reason
    assert state_store.training_lock(VIB) is None
    # a redelivery of the event finds the version done and changes nothing
    again = handler.handle_sagemaker({"detail": sagemaker_event_detail(name, "Completed",
                                                                       artifact=artifact)})
    assert again.outcome == "duplicate"


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' + b"9" * 5000 + b"}",
    b"\xff\xfe",
])
def test_unreadable_metrics_json_is_an_artifact_error(aws, settings, raw: bytes) -> None:
    key = "models/x/job/output/model.tar.gz"
    aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=artifact_bytes(
        {"model.onnx": ONNX_BYTES, "metrics.json": raw}))
    with pytest.raises(ArtifactError, match=r"metrics\.json"):
        read_metrics(aws.s3, f"s3://{settings.bucket}/{key}")


def test_registry_refusing_the_gate_result_fails_the_version(
        aws, settings, registry, state_store) -> None:
    """Whatever DynamoDB rejects as invalid (ValidationException) is final, not retried."""
    version, name = start_version(registry, state_store, VIB)
    artifact = put_artifact(aws, settings.bucket, VIB, name, metrics_doc(challenger=0.52))
    handler = CompletionHandler.create(clients=aws, settings=settings, config=CONFIG)
    real = handler.registry.transition

    def refuse_once(*args: Any, **kwargs: Any):
        if kwargs.get("metrics") is not None:
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "ValidationException",
                                         "Message": "Item size has exceeded the maximum"}},
                              "UpdateItem")
        return real(*args, **kwargs)

    with mock.patch.object(handler.registry, "transition", side_effect=refuse_once):
        result = handler.handle_sagemaker({"detail": sagemaker_event_detail(
            name, "Completed", artifact=artifact)})
    assert result.outcome == "failed"
    assert "Item size" in registry.get(VIB, version).failure_reason
    assert state_store.training_lock(VIB) is None


# ------------------------------------------------------ malformed ModelApproved


@pytest.mark.parametrize("detail", [
    None, [], "x", {}, {"model": VIB}, {"version": 3}, {"model": VIB, "version": "three"},
    {"model": VIB, "version": 10**400}, {"model": VIB, "version": 1.5},
    {"model": VIB, "version": True}, {"model": ["x"], "version": 1},
    {"model": VIB, "version": 1, "artifact": 5}, {"model": VIB, "version": 1, "rollback": "no"},
    {"model": VIB, "version": -1}, {"model": "", "version": 1},
])
def test_malformed_model_approved_is_recorded_and_dropped(aws, settings, detail: Any) -> None:
    with pytest.raises(PackagingError):
        ModelApproved.from_detail(detail)
    result = handle_model_approved(detail, clients=aws, settings=settings, config=CONFIG)
    assert result.outcome == "invalid"
    assert "ModelApproved" in result.reason


# ------------------------------------------------------------------- properties


@given(detail=st.one_of(json_values(), st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just(VIB), nasty_text(), json_values(3)),
    "version": st.one_of(st.integers(-3, 10**20), nasty_numbers(), nasty_text()),
    "artifact": st.one_of(st.none(), nasty_text(), json_values(3)),
    "manual": json_values(2), "rollback": json_values(2), "replaces": json_values(2),
    "reason": json_values(2)})))
def test_model_approved_detail_parses_or_is_a_packaging_error(detail: Any) -> None:
    try:
        event = ModelApproved.from_detail(detail)
    except PackagingError:
        return
    assert isinstance(event.model, str) and event.model
    assert type(event.version) is int and event.version >= 1
    assert event.artifact is None or isinstance(event.artifact, str)


_detail_value = st.one_of(nasty_text(), json_values(4))
_sagemaker_detail = st.fixed_dictionaries({}, optional={
    "TrainingJobName": st.one_of(st.sampled_from([f"mledge-{VIB}-v3-x", "mledge-digits-v1-"
                                                  "a", "mledge--v-", "mledge-a-v99999999999999999"
                                                  "99999-x"]), _detail_value),
    "TrainingJobStatus": st.one_of(st.sampled_from(["Completed", "Failed", "Stopped",
                                                    "InProgress"]), _detail_value),
    "FailureReason": _detail_value,
    "ModelArtifacts": st.one_of(_detail_value, st.fixed_dictionaries(
        {"S3ModelArtifacts": _detail_value})),
    "Tags": st.one_of(_detail_value, st.lists(st.fixed_dictionaries(
        {"Key": _detail_value, "Value": _detail_value}), max_size=3)),
})
_batch_detail = st.fixed_dictionaries({}, optional={
    "jobName": st.one_of(st.just(f"mledge-{VIB}-v3-x"), _detail_value),
    "status": st.one_of(st.sampled_from(["SUCCEEDED", "FAILED", "RUNNING"]), _detail_value),
    "statusReason": _detail_value, "container": _detail_value, "attempts": _detail_value,
    "tags": _detail_value,
})


def _check_change(change: JobStateChange) -> None:
    assert isinstance(change, JobStateChange)
    assert change.state in ("succeeded", "failed", "running")
    assert isinstance(change.job_name, str) and isinstance(change.raw_status, str)
    assert change.model is None or isinstance(change.model, str)
    assert change.version is None or (type(change.version) is int and change.version >= 1)
    assert change.failure_reason is None or isinstance(change.failure_reason, str)
    assert change.artifact is None or isinstance(change.artifact, str)


@given(event=st.one_of(json_values(), st.fixed_dictionaries({"detail": st.one_of(
    _sagemaker_detail, json_values())})))
def test_sagemaker_events_parse_to_a_state_change(event: Any) -> None:
    _check_change(parse_sagemaker_event(event, KNOWN))


@given(event=st.one_of(json_values(), st.fixed_dictionaries({"detail": st.one_of(
    _batch_detail, json_values())})))
def test_batch_events_parse_to_a_state_change(event: Any) -> None:
    _check_change(parse_batch_event(event, KNOWN, "bucket"))


@given(detail=_sagemaker_detail)
def test_completion_of_any_sagemaker_event_is_a_documented_outcome(
        aws, settings, detail: dict[str, Any]) -> None:
    handler = CompletionHandler.create(clients=aws, settings=settings, config=CONFIG)
    result = handler.handle_sagemaker({"detail": detail})
    assert isinstance(result, CompletionResult)
    assert result.outcome in ("ignored", "unknown", "duplicate", "failed", "rejected",
                              "approved")


@given(metrics=st.one_of(json_values(), st.fixed_dictionaries({}, optional={
    "family": json_values(2), "challenger": st.one_of(json_values(3), st.fixed_dictionaries(
        {"silhouette": st.one_of(nasty_numbers(), json_values(2))})),
    "champion": st.one_of(json_values(3), st.fixed_dictionaries(
        {"silhouette": st.one_of(nasty_numbers(), json_values(2))})),
    "parity": st.one_of(json_values(3), st.fixed_dictionaries({}, optional={
        "passed": json_values(1), "max_abs_diff": nasty_numbers(),
        "label_agreement": nasty_numbers(), "rows": nasty_numbers()})),
    "data": st.one_of(json_values(3), st.fixed_dictionaries({"train": nasty_numbers()})),
})))
def test_the_gate_decides_on_any_metrics(metrics: Any) -> None:
    if not isinstance(metrics, dict):
        metrics = {"challenger": metrics}
    decision = evaluate(CONFIG.model(VIB), metrics, champion_in_production=True,
                        champion_version=1, released_version=1)
    assert isinstance(decision, GateDecision)
    assert decision.reasons and all(isinstance(r, str) for r in decision.reasons)
    assert decision.challenger is None or decision.challenger == decision.challenger


@given(value=json_values())
def test_check_storable_accepts_or_names_the_problem(value: Any) -> None:
    from chalicelib.registry import _ser

    try:
        check_storable(value, "metrics")
    except UnstorableValueError as exc:
        assert str(exc).startswith("metrics")
        return
    _ser(value)  # what passed the check, boto3's serializer takes


@given(golden=st.one_of(json_values(), st.fixed_dictionaries({}, optional={
    "input_name": st.one_of(st.just("X"), nasty_text(), json_values(2)),
    "inputs": st.one_of(json_values(), st.lists(st.lists(nasty_numbers(), max_size=4),
                                                max_size=3)),
    "outputs": json_values(4), "tolerance": st.one_of(nasty_numbers(), json_values(2))})))
def test_golden_json_is_a_smoke_test_or_an_update_format_error(golden: Any) -> None:
    try:
        smoke = smoke_from_golden(golden)
    except UpdateFormatError:
        return
    assert smoke.inputs and all(isinstance(v, float) for row in smoke.inputs for v in row)


_s3_record = st.one_of(json_values(), st.fixed_dictionaries({}, optional={
    "eventName": st.one_of(st.just("ObjectCreated:Put"), _detail_value),
    "s3": st.one_of(_detail_value, st.fixed_dictionaries({}, optional={
        "bucket": st.one_of(_detail_value, st.fixed_dictionaries({"name": st.one_of(
            st.just("mledge-test-data"), _detail_value)})),
        "object": st.one_of(_detail_value, st.fixed_dictionaries({"key": st.one_of(
            st.just(f"raw/{VIB}/dt=2026-01-01/hour=00/x.jsonl.gz"), _detail_value)}))})),
}))
_raw_event = st.one_of(
    json_values(),
    st.fixed_dictionaries({"Records": st.lists(st.one_of(
        _s3_record,
        st.fixed_dictionaries({"messageId": _detail_value, "body": st.one_of(
            nasty_text(), json_values(),
            st.lists(_s3_record, max_size=3).map(lambda r: json.dumps({"Records": r})),
            st.lists(_s3_record, max_size=2).map(lambda r: json.dumps(
                {"Type": "Notification", "Message": json.dumps({"Records": r})})))})),
        max_size=4)}))


@given(event=_raw_event)
def test_raw_events_yield_only_s3_records(event: Any) -> None:
    for record in iter_s3_records(event):
        assert isinstance(record, dict)


@given(event=_raw_event)
def test_raw_events_are_counted_or_ignored(aws, settings, event: Any) -> None:
    report = Trigger(clients=aws, settings=settings, config=CONFIG).handle_raw_events(event)
    assert isinstance(report, TriggerReport)


def test_unreadable_raw_object_is_ignored_not_retried_forever(aws, settings) -> None:
    key = f"raw/{VIB}/dt=2026-01-01/hour=00/corrupt.jsonl.gz"
    aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=b"not gzip at all")
    event = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": settings.bucket}, "object": {"key": key}}}]}
    report = Trigger(clients=aws, settings=settings, config=CONFIG).handle_raw_events(event)
    assert report.counted == []
    assert any("unreadable" in reason for reason in report.ignored), report.ignored


_json_bytes = st.one_of(
    json_values().map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
    st.sampled_from([b"[" * 100_000, b"9" * 5000, b'{"a": ' + b"1" * 4400 + b"}", b"\xff"]),
)


@given(raw=_json_bytes)
def test_metrics_json_of_any_bytes_is_an_object_or_an_artifact_error(aws, settings,
                                                                     raw: bytes) -> None:
    key = "models/x/job/output/model.tar.gz"
    aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=artifact_bytes(
        {"model.onnx": ONNX_BYTES, "metrics.json": raw}))
    try:
        metrics = read_metrics(aws.s3, f"s3://{settings.bucket}/{key}")
    except ArtifactError:
        return
    assert isinstance(metrics, dict)


@given(raw=_json_bytes)
def test_golden_json_of_any_bytes_is_read_or_an_artifact_error(aws, settings, raw: bytes) -> None:
    from chalicelib.packaging import ArtifactError as PackagingArtifactError
    from chalicelib.packaging import read_training_artifact

    key = "models/x/job2/output/model.tar.gz"
    aws.s3.put_object(Bucket=settings.bucket, Key=key, Body=artifact_bytes(
        {"model.onnx": ONNX_BYTES, "golden.json": raw, "metrics.json": raw}))
    try:
        files = read_training_artifact(aws.s3, f"s3://{settings.bucket}/{key}",
                                       default_bucket=settings.bucket)
    except PackagingArtifactError:
        return
    assert isinstance(files.golden, dict) and isinstance(files.metrics, dict)
