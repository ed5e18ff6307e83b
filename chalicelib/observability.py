"""Logs and metrics: one Powertools Logger for the whole app, Powertools EMF metrics.

Logging: every chalicelib module logs through `Logger(child=True)`; `LOGGER` here is
their parent (service `POWERTOOLS_SERVICE_NAME`, level `POWERTOOLS_LOG_LEVEL`, INFO
unless a stage says otherwise), so every module's INFO lines reach CloudWatch as JSON.
`correlated(model=..., version=..., job=...)` adds those keys to every line logged
inside it, whichever module logs.

Metrics: `PipelineMetrics.emit` writes CloudWatch Embedded Metric Format lines through
Powertools (namespace `POWERTOOLS_METRICS_NAMESPACE`), twice: with dimensions
{service, stage, model} for per-model graphs, and {service, stage} for the stage-wide
alarms in infra/pipeline.yaml (an alarm cannot sum over an open set of models). A
metric that cannot be written is logged and dropped: observability never fails (and so
retries) the work it describes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit, SchemaValidationError

LOGGER = Logger(level=os.environ.get("POWERTOOLS_LOG_LEVEL") or "INFO")
logger = Logger(child=True)

# Metric names (infra/pipeline.yaml's dashboard and alarms use the same names).
TRAININGS_STARTED = "TrainingsStarted"
TRAININGS_FAILED = "TrainingsFailed"
GATE_APPROVED = "GateApproved"
GATE_REJECTED = "GateRejected"
GATE_SCORE = "GateChallengerScore"
RELEASES = "Releases"
RELEASE_BYTES = "ReleaseFullBytes"
RELEASE_DELTA_BYTES = "ReleaseSmallestDeltaBytes"
RECORDS_ACCEPTED = "RecordsAccepted"
RECORDS_QUARANTINED = "RecordsQuarantined"
SUMMARIES_STORED = "SummariesStored"
DEVICE_READINGS = "DeviceReadings"
DEVICE_ANOMALIES = "DeviceAnomalies"
ANOMALY_RATE = "DeviceAnomalyRate"
ROLLOUT_PREFIX = "Rollout"  # + an IoT Jobs execution status: RolloutSucceeded, RolloutFailed, ...
ROLLOUT_PERCENT = "RolloutSucceededPercent"

Metric = tuple[float, str]  # value, MetricUnit name


_added_keys: ContextVar[list[str] | None] = ContextVar("mledge_correlation_keys", default=None)


@contextlib.contextmanager
def correlated(**keys: Any) -> Iterator[None]:
    """Add correlation keys (model, version, job, ...) to every log line inside; keys
    that `correlate` adds inside are removed on exit too (a warm container's next
    invocation starts clean)."""
    added: list[str] = []
    token = _added_keys.set(added)
    try:
        correlate(**keys)
        yield
    finally:
        _added_keys.reset(token)
        LOGGER.remove_keys(added)


def correlate(**keys: Any) -> None:
    """Add correlation keys learnt midway (a job id) to the enclosing `correlated`."""
    present = {k: v for k, v in keys.items() if v is not None}
    added = _added_keys.get()
    if added is None:
        raise RuntimeError("correlate() outside correlated(): the keys would never be removed")
    LOGGER.append_keys(**present)
    added.extend(present)


_metrics_off: ContextVar[bool] = ContextVar("mledge_metrics_off", default=False)


@contextlib.contextmanager
def metrics_off() -> Iterator[None]:
    """No EMF lines inside: outside Lambda (the `mledge` CLI) stdout is the operator's
    terminal, and nothing ships EMF from there to CloudWatch."""
    token = _metrics_off.set(True)
    try:
        yield
    finally:
        _metrics_off.reset(token)


class PipelineMetrics:
    """EMF metrics of one stage; `emit` is the only way code here records a metric."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def emit(self, model: str, values: Mapping[str, Metric],
             metadata: Mapping[str, Any] | None = None) -> None:
        if not values or _metrics_off.get():
            return
        for dimensions in ({"stage": self.stage, "model": model}, {"stage": self.stage}):
            metrics = EphemeralMetrics()
            for name, dimension in dimensions.items():
                metrics.add_dimension(name=name, value=dimension)
            for name, (amount, unit) in values.items():
                metrics.add_metric(name=name, unit=MetricUnit[unit], value=amount)
            for key, extra in (metadata or {}).items():
                metrics.add_metadata(key=key, value=extra)
            try:
                metrics.flush_metrics()
            except SchemaValidationError as exc:
                logger.warning("metrics not published", extra={"error": str(exc),
                                                                "metrics": sorted(values)})

    # -- what the pipeline reports ----------------------------------------------------

    def training_started(self, model: str, version: int, backend: str) -> None:
        self.emit(model, {TRAININGS_STARTED: (1, "Count")},
                  {"version": version, "backend": backend})

    def training_failed(self, model: str, version: int, reason: str) -> None:
        self.emit(model, {TRAININGS_FAILED: (1, "Count")},
                  {"version": version, "reason": reason[:300]})

    def gate_decision(self, model: str, version: int, approved: bool, metric: str,
                      score: float | None) -> None:
        values: dict[str, Metric] = {(GATE_APPROVED if approved else GATE_REJECTED): (1, "Count")}
        if score is not None:
            values[GATE_SCORE] = (score, "NoUnit")
        self.emit(model, values, {"version": version, "metric": metric})

    def release(self, model: str, version: int, full_bytes: int,
                delta_bytes: list[int], rollback: bool) -> None:
        values: dict[str, Metric] = {RELEASES: (1, "Count"), RELEASE_BYTES: (full_bytes, "Bytes")}
        if delta_bytes:
            values[RELEASE_DELTA_BYTES] = (min(delta_bytes), "Bytes")
        self.emit(model, values, {"version": version, "rollback": rollback})

    def ingest(self, model: str, accepted: int, quarantined: int, summaries: int,
               readings: int, anomalies: int) -> None:
        values: dict[str, Metric] = {
            RECORDS_ACCEPTED: (accepted, "Count"),
            RECORDS_QUARANTINED: (quarantined, "Count"),
            SUMMARIES_STORED: (summaries, "Count"),
        }
        if readings:
            values[DEVICE_READINGS] = (readings, "Count")
            values[DEVICE_ANOMALIES] = (anomalies, "Count")
            values[ANOMALY_RATE] = (round(100.0 * anomalies / readings, 4), "Percent")
        self.emit(model, values)

    def rollout(self, model: str, version: int, job_id: str, counts: Mapping[str, int]) -> None:
        values: dict[str, Metric] = {
            f"{ROLLOUT_PREFIX}{status.title().replace('_', '')}": (count, "Count")
            for status, count in counts.items()
        }
        total = sum(counts.values())
        if total:
            values[ROLLOUT_PERCENT] = (round(100.0 * counts.get("SUCCEEDED", 0) / total, 2),
                                       "Percent")
        self.emit(model, values, {"version": version, "job_id": job_id})
