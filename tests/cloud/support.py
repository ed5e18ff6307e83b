"""Helpers of the cloud tests: artifacts and metrics as the training image writes them,
versions in each registry state, EventBridge events as AWS sends them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

from chalicelib.layout import training_artifact_key
from chalicelib.registry import Registry, Status
from chalicelib.state import StateStore

ONNX_BYTES = b"\x08\x07fake-onnx-model-bytes" * 10


def metrics_doc(*, family: str = "kmeans_anomaly", metric: str = "silhouette",
                challenger: float | None = 0.45, champion: float | None = None,
                parity: bool = True, train: int = 4000,
                onnx_bytes: bytes = ONNX_BYTES,
                detection: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metrics.json as the training image writes it (`detection`: no verdicts yet)."""
    if detection is None and family == "kmeans_anomaly":
        none = {"fault_detection": None, "false_alarms": None}
        detection = {"labelled_faults": 0, "labelled_normal": 0,
                     "faults_kept_out_of_training": 0, "challenger": none,
                     "champion": none if champion is not None else None}
    return {
        "family": family,
        "metric": metric,
        "challenger": {metric: challenger} if challenger is not None else {},
        "champion": {metric: champion} if champion is not None else None,
        "parity": {"passed": parity, "max_abs_diff": 2e-6 if parity else 0.3,
                   "label_agreement": 1.0 if parity else 0.9, "rows": 200},
        "detection": detection,
        "data": {"records": train + train // 4, "train": train, "holdout": train // 4,
                 "files": 3, "skipped_records": 0},
        "model": {"k": 3, "anomaly_threshold": 1.7},
        "onnx": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "size": len(onnx_bytes)},
    }


def artifact_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_artifact(aws: Any, bucket: str, model: str, job_name: str,
                 metrics: dict[str, Any] | None = None, *,
                 members: dict[str, bytes] | None = None) -> str:
    """Upload a job's model.tar.gz; returns its s3:// URI."""
    if members is None:
        members = {
            "model.onnx": ONNX_BYTES,
            "metrics.json": json.dumps(metrics if metrics is not None else metrics_doc()).encode(),
            "golden.json": b'{"input_name": "input", "inputs": [], "outputs": {}}',
        }
    key = training_artifact_key(model, job_name)
    aws.s3.put_object(Bucket=bucket, Key=key, Body=artifact_bytes(members))
    return f"s3://{bucket}/{key}"


def job_name(model: str, version: int, suffix: str = "20260101t000000") -> str:
    return f"mledge-{model}-v{version}-{suffix}"


def start_version(registry: Registry, state: StateStore, model: str, *,
                  backend: str = "sagemaker") -> tuple[int, str]:
    """What the trigger does when it starts a training: version, lock, TRAINING record."""
    version = registry.allocate_version(model)
    name = job_name(model, version)
    assert state.acquire_training_lock(model, version, name)
    registry.create_training(model, version, {
        "dataset_key": f"datasets/{model}/v{version:05d}/manifest.json",
        "code_version": "test", "hyperparameters": {"seed": "7"}, "job_name": name,
        "backend": backend, "started_at": "2026-01-01T00:00:00+00:00",
    })
    return version, name


def released_version_with(registry: Registry, state: StateStore, model: str,
                          aws: Any, bucket: str, score: float) -> int:
    """A version that passed the gate and was released (as packaging would do)."""
    version, name = start_version(registry, state, model)
    artifact = put_artifact(aws, bucket, model, name, metrics_doc(challenger=score))
    registry.transition(model, version, Status.APPROVED, expected=[Status.TRAINING],
                        reason="test approval", artifact=artifact,
                        metrics=metrics_doc(challenger=score))
    state.release_training_lock(model, version)
    registry.mark_released(model, version, {"job_id": f"{model}-v{version}"})
    return version


def sagemaker_event_detail(name: str, status: str, *, artifact: str | None = None,
                           failure: str | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "TrainingJobStatus": status,
        "SecondaryStatus": status,
    }
    if artifact:
        detail["ModelArtifacts"] = {"S3ModelArtifacts": artifact}
    if failure:
        detail["FailureReason"] = failure
    return detail


def batch_event_detail(name: str, status: str, *, reason: str | None = None,
                       exit_code: int | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "jobName": name, "jobId": "8f2a-test", "jobQueue": "arn:aws:batch:q", "status": status,
        "attempts": [], "container": {},
    }
    if reason:
        detail["statusReason"] = reason
    if exit_code is not None:
        detail["container"] = {"exitCode": exit_code, "reason": "OutOfMemoryError: Container killed"}
    return detail


def approved_events_queue(aws: Any, settings: Any) -> str:
    """An SQS queue that receives every ModelApproved (EventBridge rule -> SQS in moto)."""
    url = aws.sqs.create_queue(QueueName="model-approved-capture")["QueueUrl"]
    arn = aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    aws.events.put_rule(Name="capture-approved", EventBusName=settings.event_bus,
                        EventPattern=json.dumps({"source": [settings.event_source],
                                                 "detail-type": ["ModelApproved"]}))
    aws.events.put_targets(Rule="capture-approved", EventBusName=settings.event_bus,
                           Targets=[{"Id": "q", "Arn": arn}])
    return url


def received_details(aws: Any, queue_url: str) -> list[dict[str, Any]]:
    details = []
    while True:
        messages = aws.sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=0).get("Messages", [])
        if not messages:
            return details
        for message in messages:
            details.append(json.loads(message["Body"])["detail"])
            aws.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
