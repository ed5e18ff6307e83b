"""Training completion: SageMaker / Batch state-change events -> registry, gate, ModelApproved.

One handler per event source (app.py), one function here that does the work:

- intermediate states (InProgress, Stopping, SUBMITTED ... RUNNING) are ignored;
- Failed / Stopped / FAILED: the version becomes FAILED with the job's reason;
- Completed / SUCCEEDED: read ``metrics.json`` from the job's ``model.tar.gz``
  (missing or corrupt artifact: FAILED with the reason), run the gate, store
  metrics + decision + reasons, REJECTED or APPROVED, and on approval emit
  ``ModelApproved``;
- the model's training lock is released (conditional on the version holding it)
  when the version fails or is rejected; an approved version keeps it until
  packaging has released it (or skipped or failed to), so the next training is
  scored against the model the fleet will run, not one about to be replaced.

Repeated or concurrent events are harmless: the TRAINING -> ... transition is
conditional (only one handler moves the version), and the approval is announced
through a state-table marker claimed before sending (only one ModelApproved per
approval; a send that failed is retried by the next delivery).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from mledge_update.events import (
    BATCH_DETAIL_TYPE,
    BATCH_SOURCE,
    LOCAL_TRAINING_SOURCE,
    SAGEMAKER_DETAIL_TYPE,
    SAGEMAKER_SOURCE,
)
from mledge_update.naming import identify_job

from chalicelib.artifacts import MAX_MEMBER_BYTES, ArtifactError, open_object, parse_s3_uri, tar_members
from chalicelib.aws import AwsClients, error_code
from chalicelib.config import PipelineConfig, UnknownModelError
from chalicelib.gate import evaluate
from chalicelib.model_events import (
    announce_approval_once,
    model_approved_detail,
    training_artifact_uri,
)
from chalicelib.observability import PipelineMetrics, correlated
from chalicelib.registry import (
    Registry,
    Status,
    TransitionError,
    UnknownVersionError,
    UnstorableValueError,
    check_storable,
)
from chalicelib.settings import Settings
from chalicelib.state import StateStore
from chalicelib.untrusted import safe_repr

logger = Logger(child=True)

SAGEMAKER_PATTERN = {"source": [SAGEMAKER_SOURCE], "detail-type": [SAGEMAKER_DETAIL_TYPE]}
BATCH_PATTERN = {"source": [BATCH_SOURCE], "detail-type": [BATCH_DETAIL_TYPE]}
LOCAL_PATTERN = {"source": [LOCAL_TRAINING_SOURCE], "detail-type": [SAGEMAKER_DETAIL_TYPE]}

SAGEMAKER_SUCCEEDED = {"Completed"}
SAGEMAKER_FAILED = {"Failed", "Stopped"}
BATCH_SUCCEEDED = {"SUCCEEDED"}
BATCH_FAILED = {"FAILED"}

# metrics.json is small; a bigger member is not ours.
_MAX_METRICS_BYTES = 1 << 20


@dataclass(frozen=True)
class JobStateChange:
    """A training job state change, whatever service reported it."""

    backend: str
    job_name: str
    model: str | None
    version: int | None
    state: str  # "succeeded" | "failed" | "running"
    raw_status: str
    failure_reason: str | None = None
    artifact: str | None = None


@dataclass
class CompletionResult:
    outcome: str  # ignored | unknown | duplicate | failed | rejected | approved
    model: str | None = None
    version: int | None = None
    message: str = ""
    reasons: list[str] = field(default_factory=list)
    lock_released: bool = False
    announced: bool = False


# ---------------------------------------------------------------- parsing events


def _detail(event: Any) -> dict[str, Any]:
    detail = event.get("detail") if isinstance(event, dict) else None
    return detail if isinstance(detail, dict) else {}


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _reason_text(value: Any) -> str:
    """A failure reason from an event: its text, or its JSON-ish repr, at most 1,024 chars."""
    text = value if isinstance(value, str) else safe_repr(value)
    return text[:1024]


def parse_sagemaker_event(event: dict[str, Any], known_models: set[str], *,
                          backend: str = "sagemaker") -> JobStateChange:
    detail = _detail(event)
    job_name = _string(detail.get("TrainingJobName"))
    status = _string(detail.get("TrainingJobStatus"))
    ident = identify_job(job_name, detail.get("Tags"), known_models)
    if status in SAGEMAKER_SUCCEEDED:
        state = "succeeded"
    elif status in SAGEMAKER_FAILED:
        state = "failed"
    else:
        state = "running"
    reason = None
    if state == "failed":
        given = _reason_text(detail["FailureReason"]) if detail.get("FailureReason") else ""
        reason = given or (
            "training job was stopped" if status == "Stopped" else "training job failed")
        if status == "Stopped" and given:
            reason = f"stopped: {given}"
    artifacts = detail.get("ModelArtifacts")
    artifact = artifacts.get("S3ModelArtifacts") if isinstance(artifacts, dict) else None
    artifact = artifact if isinstance(artifact, str) and artifact else None
    return JobStateChange(
        backend=backend, job_name=job_name,
        model=ident[0] if ident else None, version=ident[1] if ident else None,
        state=state, raw_status=status, failure_reason=reason, artifact=artifact,
    )


def parse_batch_event(event: dict[str, Any], known_models: set[str], bucket: str) \
        -> JobStateChange:
    detail = _detail(event)
    job_name = _string(detail.get("jobName"))
    status = _string(detail.get("status"))
    ident = identify_job(job_name, detail.get("tags"), known_models)
    if status in BATCH_SUCCEEDED:
        state = "succeeded"
    elif status in BATCH_FAILED:
        state = "failed"
    else:
        state = "running"
    reason = None
    if state == "failed":
        reason = _batch_failure_reason(detail)
    artifact = training_artifact_uri(bucket, ident[0], job_name) if ident else None
    return JobStateChange(
        backend="batch", job_name=job_name,
        model=ident[0] if ident else None, version=ident[1] if ident else None,
        state=state, raw_status=status, failure_reason=reason, artifact=artifact,
    )


def _batch_failure_reason(detail: dict[str, Any]) -> str:
    parts: list[str] = []
    if detail.get("statusReason"):
        parts.append(_reason_text(detail["statusReason"]))
    container = detail.get("container")
    container = dict(container) if isinstance(container, dict) else {}
    attempts = detail.get("attempts")
    if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict):
        last = attempts[-1].get("container")
        container = {**(last if isinstance(last, dict) else {}), **container}
    if container.get("reason"):
        parts.append(_reason_text(container["reason"]))
    if container.get("exitCode") not in (None, 0):
        parts.append(f"exit code {_reason_text(container['exitCode'])[:40]}")
    return "; ".join(dict.fromkeys(parts)) or "batch job failed"


# ---------------------------------------------------------------- the artifact


def read_metrics(s3: Any, artifact_uri: str) -> dict[str, Any]:
    """metrics.json out of a job's model.tar.gz, after checking model.onnx is there too.

    Streams the archive (it is not held in memory). When metrics.json names the
    ONNX file's SHA-256, the model.onnx in the archive must match it.
    """
    bucket, key = parse_s3_uri(artifact_uri)
    body = open_object(s3, bucket, key)
    metrics_bytes: bytes | None = None
    onnx_sha256: str | None = None
    limits = {"metrics.json": _MAX_METRICS_BYTES, "model.onnx": MAX_MEMBER_BYTES}
    for name, handle in tar_members(body, artifact_uri, limits):
        if name == "metrics.json":
            metrics_bytes = handle.read()
        else:
            digest = hashlib.sha256()
            for chunk in iter(functools.partial(handle.read, 1 << 20), b""):
                digest.update(chunk)
            onnx_sha256 = digest.hexdigest()
    if metrics_bytes is None:
        raise ArtifactError(f"model artifact {artifact_uri} has no metrics.json")
    if onnx_sha256 is None:
        raise ArtifactError(f"model artifact {artifact_uri} has no model.onnx")
    try:
        metrics = json.loads(metrics_bytes.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, an integer past Python's digit limit
        raise ArtifactError(f"metrics.json in {artifact_uri} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ArtifactError(f"metrics.json in {artifact_uri} is nested too deeply to parse") \
            from None
    if not isinstance(metrics, dict):
        raise ArtifactError(f"metrics.json in {artifact_uri} is not a JSON object")
    expected_sha = (metrics.get("onnx") or {}).get("sha256") \
        if isinstance(metrics.get("onnx"), dict) else None
    if expected_sha and expected_sha != onnx_sha256:
        raise ArtifactError(f"model.onnx in {artifact_uri} does not match metrics.json's "
                            f"onnx.sha256 (corrupt artifact)")
    return metrics


# ---------------------------------------------------------------- handling


class CompletionHandler:
    """The completion logic over a registry, a state store, S3 and EventBridge."""

    def __init__(self, *, registry: Registry, state: StateStore, s3: Any, events: Any,
                 settings: Settings, config: PipelineConfig) -> None:
        self.registry = registry
        self.state = state
        self.s3 = s3
        self.events = events
        self.settings = settings
        self.config = config
        self.metrics = PipelineMetrics(settings.stage)

    @classmethod
    def create(cls, *, clients: AwsClients, settings: Settings, config: PipelineConfig,
               registry: Registry | None = None, state: StateStore | None = None) -> CompletionHandler:
        return cls(
            registry=registry or Registry.for_settings(settings, clients),
            state=state or StateStore.for_settings(settings, clients),
            s3=clients.s3, events=clients.events, settings=settings, config=config,
        )

    @property
    def known_models(self) -> set[str]:
        return set(self.config.models)

    def handle_sagemaker(self, event: dict[str, Any], *, backend: str = "sagemaker") \
            -> CompletionResult:
        return self.handle(parse_sagemaker_event(event, self.known_models, backend=backend))

    def handle_batch(self, event: dict[str, Any]) -> CompletionResult:
        return self.handle(parse_batch_event(event, self.known_models, self.settings.bucket))

    def handle(self, change: JobStateChange) -> CompletionResult:
        if change.model is None or change.version is None:
            logger.info("ignoring %s job %r: not an mledge training job", change.backend,
                     change.job_name)
            return CompletionResult("ignored", message=f"not an mledge job: {change.job_name}")
        with correlated(model=change.model, version=change.version, job=change.job_name):
            return self._handle(change)

    def _handle(self, change: JobStateChange) -> CompletionResult:
        model, version = change.model, change.version
        assert model is not None and version is not None
        if change.state == "running":
            return CompletionResult("ignored", model, version,
                                    f"intermediate state {change.raw_status}")
        try:
            record = self.registry.get(model, version)
        except UnknownVersionError:
            # Not ours to record (or the trigger died before writing it); free the lock
            # if this version holds it so the model can train again.
            released = self.state.release_training_lock(model, version)
            logger.warning("completion of %s for %s v%s: version not in the registry",
                        change.job_name, model, version)
            return CompletionResult("unknown", model, version,
                                    f"{model} v{version} is not in the registry",
                                    lock_released=released)
        if record.status is not Status.TRAINING:
            return self._duplicate(model, version, record.status)
        if change.state == "failed":
            return self._record_failure(change, change.failure_reason or "training job failed")
        return self._gate(change)

    def _duplicate(self, model: str, version: int, status: Status) -> CompletionResult:
        # The version already left TRAINING; finish what the first delivery may not
        # have: the lock (an approval keeps it until packaging is done), and the
        # announcement of an approval.
        released = False
        if status is not Status.APPROVED:
            released = self.state.release_training_lock(model, version)
        announced = False
        if status is Status.APPROVED:
            record = self.registry.get(model, version)
            announced = self._announce(record)
        return CompletionResult("duplicate", model, version,
                                f"{model} v{version} is already {status}",
                                lock_released=released, announced=announced)

    def _record_failure(self, change: JobStateChange, reason: str) -> CompletionResult:
        model, version = change.model, change.version
        assert model is not None and version is not None
        try:
            self.registry.transition(
                model, version, Status.FAILED, expected=[Status.TRAINING],
                reason=f"{change.backend} job {change.job_name} {change.raw_status}: {reason}",
                failure_reason=reason,
            )
        except TransitionError:
            current = self.registry.get(model, version)
            return self._duplicate(model, version, current.status)
        released = self.state.release_training_lock(model, version)
        logger.info("%s v%s FAILED: %s", model, version, reason)
        self.metrics.training_failed(model, version, reason)
        return CompletionResult("failed", model, version, reason, [reason],
                                lock_released=released)

    def _gate(self, change: JobStateChange) -> CompletionResult:
        model, version = change.model, change.version
        assert model is not None and version is not None
        artifact = change.artifact or training_artifact_uri(self.settings.bucket, model,
                                                            change.job_name)
        try:
            model_config = self.config.model(model)
        except UnknownModelError as exc:
            return self._record_failure(change, f"model is not in the pipeline config: {exc}")
        try:
            metrics = read_metrics(self.s3, artifact)
            check_storable(metrics, "metrics")
        except ArtifactError as exc:
            return self._record_failure(change, str(exc))
        except UnstorableValueError as exc:
            # Stored as is it would fail the write on every redelivery and hold the lock.
            return self._record_failure(change, f"metrics.json cannot be stored in the "
                                                f"registry: {exc}")
        released_version = self.registry.released_version(model)
        scored_against = self.registry.get(model, version).lineage.get("champion_version")
        decision = evaluate(model_config, metrics,
                            champion_in_production=released_version is not None,
                            champion_version=scored_against if isinstance(scored_against, int)
                            else None,
                            released_version=released_version)
        to = Status.APPROVED if decision.approved else Status.REJECTED
        try:
            record = self.registry.transition(
                model, version, to, expected=[Status.TRAINING],
                reason=f"gate: {decision.summary()}",
                metrics=metrics, gate=decision.to_dict(), artifact=artifact,
            )
        except TransitionError:
            current = self.registry.get(model, version)
            return self._duplicate(model, version, current.status)
        except ClientError as exc:
            if error_code(exc) != "ValidationException":
                raise  # throttling, outages: the event is redelivered
            # DynamoDB refused the content itself: retrying cannot succeed.
            return self._record_failure(change, f"the registry refused the gate result: "
                                                f"{exc.response.get('Error', {}).get('Message')}")
        # An approval keeps the lock: packaging releases it once the release is done.
        released = False if decision.approved else self.state.release_training_lock(model,
                                                                                     version)
        announced = self._announce(record) if decision.approved else False
        logger.info("%s v%s %s: %s", model, version, to, "; ".join(decision.reasons))
        self.metrics.gate_decision(model, version, decision.approved, decision.metric,
                                   decision.challenger)
        return CompletionResult(to.lower(), model, version, decision.summary(),
                                decision.reasons, lock_released=released, announced=announced)

    def _announce(self, record: Any) -> bool:
        artifact = record.artifact or training_artifact_uri(
            self.settings.bucket, record.model, record.job_name or "")
        manual = bool(record.override)
        detail = model_approved_detail(record.model, record.version, artifact, manual=manual)
        return announce_approval_once(self.state, self.events, self.settings, detail)


def handle_sagemaker_event(event: dict[str, Any], *, clients: AwsClients, settings: Settings,
                           config: PipelineConfig, **stores: Any) -> CompletionResult:
    return CompletionHandler.create(clients=clients, settings=settings, config=config, **stores) \
        .handle_sagemaker(event)


def handle_local_training_event(event: dict[str, Any], *, clients: AwsClients,
                                settings: Settings, config: PipelineConfig, **stores: Any) -> CompletionResult:
    return CompletionHandler.create(clients=clients, settings=settings, config=config, **stores) \
        .handle_sagemaker(event, backend="local")


def handle_batch_event(event: dict[str, Any], *, clients: AwsClients, settings: Settings,
                       config: PipelineConfig, **stores: Any) -> CompletionResult:
    return CompletionHandler.create(clients=clients, settings=settings, config=config, **stores) \
        .handle_batch(event)


__all__ = [
    "BATCH_PATTERN", "LOCAL_PATTERN", "SAGEMAKER_PATTERN", "ArtifactError", "CompletionHandler",
    "CompletionResult", "JobStateChange", "handle_batch_event", "handle_local_training_event",
    "handle_sagemaker_event", "identify_job", "parse_batch_event", "parse_sagemaker_event",
    "read_metrics",
]
