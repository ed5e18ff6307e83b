"""Rollout progress of each model's current release, as metrics (a schedule tick).

IoT Jobs counts each release job's executions by status (`jobProcessDetails`); this
reads them for every model's current release and emits `Rollout<Status>` counts and
`RolloutSucceededPercent` (chalicelib/observability.py), which the dashboard graphs
and the failed-executions alarm in infra/pipeline.yaml watches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import PipelineConfig
from chalicelib.observability import PipelineMetrics, correlated
from chalicelib.registry import Registry
from chalicelib.settings import Settings

logger = Logger(child=True)

REPORT_MINUTES = 5
# jobProcessDetails field -> execution status
COUNT_FIELDS = {
    "numberOfQueuedThings": "QUEUED",
    "numberOfInProgressThings": "IN_PROGRESS",
    "numberOfSucceededThings": "SUCCEEDED",
    "numberOfFailedThings": "FAILED",
    "numberOfRejectedThings": "REJECTED",
    "numberOfTimedOutThings": "TIMED_OUT",
    "numberOfCanceledThings": "CANCELED",
    "numberOfRemovedThings": "REMOVED",
}


@dataclass(frozen=True)
class RolloutProgress:
    model: str
    version: int
    job_id: str
    job_status: str
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "job_id": self.job_id,
                "job_status": self.job_status, "counts": self.counts}


def execution_counts(job: dict[str, Any]) -> dict[str, int]:
    details = job.get("jobProcessDetails") or {}
    return {status: int(details.get(name) or 0) for name, status in COUNT_FIELDS.items()}


def report_rollouts(*, clients: AwsClients, settings: Settings,
                    config: PipelineConfig) -> list[RolloutProgress]:
    """Emit the rollout metrics of every model's current release; returns what it saw."""
    registry = Registry(settings.registry_table, clients.dynamodb)
    metrics = PipelineMetrics(settings.stage)
    seen: list[RolloutProgress] = []
    for model in sorted(config.models):
        release = registry.current_release(model)
        job_id = str((release.release or {}).get("job_id") or "") if release else ""
        if release is None or not job_id:
            continue
        with correlated(model=model, version=release.version, job=job_id):
            try:
                job = clients.iot.describe_job(jobId=job_id)["job"]
            except ClientError as exc:
                logger.warning("rollout not readable", extra={"error": error_code(exc) or str(exc)})
                continue
            progress = RolloutProgress(model, release.version, job_id, str(job.get("status", "")),
                                       execution_counts(job))
            metrics.rollout(model, release.version, job_id, progress.counts)
            logger.info("rollout progress", extra=progress.to_dict())
            seen.append(progress)
    return seen
