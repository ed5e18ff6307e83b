"""Health-gated rollout: canary first, the fleet only when healthy, automatic rollback.

With `[models.<name>.canary]` set, packaging releases a new version to the canary
group only (job `...-canary`, release phase `canary`) and asks each canary
device for a health report (job document `health`). `tick` (the `canary_tick`
Lambda, every minute) judges each model's current release:

- phase `canary`: from the canary job's executions, `judge` says
  - `promote`: at least `min_reports` canary devices reported a health within
    every limit and no limit is broken -> the same document goes to the whole
    fleet (job `mledge-<model>-v<N>`, the model's rollout/abort/timeout configs),
    the registry's release becomes phase `fleet` with the canary's figures;
  - `abort`: failures above `max_failure_percent`, any report above a limit, the
    canary job aborted/canceled, or no verdict within `max_wait_minutes` ->
    the canary job is canceled and the fleet rolled back (below);
  - `wait` otherwise;
- phase `fleet`: when the fleet job was aborted by its abort config (IoT Jobs
  cancels it with reasonCode `ABORTED`), the fleet is rolled back.

A rollback asks packaging, through a `ModelApproved` event with `rollback`, to
release the previous version to the model's group again (the devices that
installed the bad version go back; the others already run it). The registry
records the reason on both versions: the bad one gets a history entry and
`release.auto_rollback`, the previous one is RELEASED again with the reason,
the bad one becomes ROLLED_BACK. Without a previous release there is nothing
to go back to: the job is canceled and the reason recorded.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from mledge_update.document import HEALTH_DETAIL_KEYS
from mledge_update.naming import iot_job_id

from chalicelib import ota
from chalicelib.aws import AwsClients, error_code
from chalicelib.config import CanaryConfig, ModelConfig, PipelineConfig
from chalicelib.model_events import emit_model_approved, model_approved_detail, new_attempt
from chalicelib.registry import (
    RELEASED_AT_SOME_POINT,
    Registry,
    TransitionError,
    VersionRecord,
    now_iso,
)
from chalicelib.settings import Settings

logger = Logger(child=True)

FAILURE_STATUSES = ("FAILED", "REJECTED", "TIMED_OUT")
TICK_MINUTES = 1
PROMOTE, ABORT, WAIT = "promote", "abort", "wait"


class CanaryError(Exception):
    """A canary decision could not be carried out (the job or registry refused)."""


@dataclass(frozen=True)
class DeviceHealth:
    """One canary device's execution: its status and the health figures it reported."""

    thing: str
    status: str
    error_rate: float | None = None
    anomaly_rate: float | None = None
    latency_p95_ms: float | None = None

    @classmethod
    def from_execution(cls, thing: str, status: str, details: dict[str, str]) -> DeviceHealth:
        def number(key: str) -> float | None:
            try:
                value = float(details[key])
            except (KeyError, TypeError, ValueError):
                return None
            # "nan" compares False with every limit: it must not pass as healthy.
            return value if math.isfinite(value) else None

        error, anomaly, latency = (number(k) for k in HEALTH_DETAIL_KEYS[1:])
        return cls(thing, status, error, anomaly, latency)

    @property
    def reported(self) -> bool:
        return self.status == "SUCCEEDED" and None not in (
            self.error_rate, self.anomaly_rate, self.latency_p95_ms)


@dataclass(frozen=True)
class Verdict:
    decision: str  # promote | abort | wait
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def judge(devices: list[DeviceHealth], limits: CanaryConfig, *, age_minutes: float,
          job_status: str = "IN_PROGRESS", job_reason: str = "") -> Verdict:
    """The canary's verdict from its devices' executions (a pure function)."""
    reports = [d for d in devices if d.reported]
    failed = [d for d in devices if d.status in FAILURE_STATUSES]
    executed = [d for d in devices if d.status in ("SUCCEEDED", *FAILURE_STATUSES)]
    figures: dict[str, Any] = {
        "devices": len(devices), "executed": len(executed), "failed": len(failed),
        "reports": len(reports),
    }
    if reports:
        figures.update(
            max_error_rate=max(d.error_rate or 0.0 for d in reports),
            max_anomaly_rate=max(d.anomaly_rate or 0.0 for d in reports),
            max_latency_p95_ms=max(d.latency_p95_ms or 0.0 for d in reports),
        )
    if job_status in ("CANCELED", "DELETION_IN_PROGRESS"):
        return Verdict(ABORT, f"the canary job was {job_status.lower()}"
                       + (f" ({job_reason})" if job_reason else ""), figures)
    if executed and 100.0 * len(failed) / len(executed) > limits.max_failure_percent:
        kinds = sorted({d.status for d in failed})
        return Verdict(ABORT, f"{len(failed)} of {len(executed)} canary devices failed the "
                              f"update ({', '.join(kinds)}), above "
                              f"{limits.max_failure_percent:g}%", figures)
    broken = []
    for d in reports:
        if (d.error_rate or 0.0) > limits.max_error_rate:
            broken.append(f"{d.thing}: error rate {d.error_rate:g} > {limits.max_error_rate:g}")
        if (d.anomaly_rate or 0.0) > limits.max_anomaly_rate:
            broken.append(f"{d.thing}: anomaly rate {d.anomaly_rate:g} > "
                          f"{limits.max_anomaly_rate:g}")
        if (d.latency_p95_ms or 0.0) > limits.max_latency_ms:
            broken.append(f"{d.thing}: p95 latency {d.latency_p95_ms:g} ms > "
                          f"{limits.max_latency_ms:g} ms")
    if broken:
        more = f" (+{len(broken) - 3} more)" if len(broken) > 3 else ""
        return Verdict(ABORT, "unhealthy canary: " + "; ".join(broken[:3]) + more, figures)
    if len(reports) >= limits.min_reports:
        return Verdict(PROMOTE, f"{len(reports)} canary devices healthy", figures)
    if age_minutes >= limits.max_wait_minutes:
        return Verdict(ABORT, f"only {len(reports)} of {limits.min_reports} health reports "
                              f"within {limits.max_wait_minutes} minutes", figures)
    return Verdict(WAIT, f"{len(reports)} of {limits.min_reports} health reports so far",
                   figures)


# ------------------------------------------------------------------- reading


def _job_devices(iot: Any, job_id: str) -> list[DeviceHealth]:
    out = []
    kwargs: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
    while True:
        page = iot.list_job_executions_for_job(**kwargs)
        for summary in page.get("executionSummaries", []):
            thing = str(summary.get("thingArn", "")).rsplit("/", 1)[-1]
            status = summary.get("jobExecutionSummary", {}).get("status", "UNKNOWN")
            details: dict[str, str] = {}
            if status == "SUCCEEDED":  # only a finished execution carries a health report
                execution = iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]
                details = execution.get("statusDetails", {}).get("detailsMap", {}) or {}
            out.append(DeviceHealth.from_execution(thing, status, details))
        if not page.get("nextToken"):
            return out
        kwargs["nextToken"] = page["nextToken"]


def _age_minutes(record: VersionRecord, now: dt.datetime) -> float:
    released = (record.release or {}).get("released_at")
    if not released:
        return 0.0
    started = dt.datetime.fromisoformat(str(released).replace("Z", "+00:00"))
    if started.tzinfo is None:
        started = started.replace(tzinfo=dt.UTC)
    return max(0.0, (now - started).total_seconds() / 60.0)


# -------------------------------------------------------------------- acting


@dataclass
class TickResult:
    model: str
    version: int | None
    decision: str
    reason: str
    job_id: str | None = None


def tick(*, clients: AwsClients, settings: Settings, config: PipelineConfig,
         now: dt.datetime | None = None) -> list[TickResult]:
    """Judge every model's current release once; act on promote / abort."""
    now = now or dt.datetime.now(dt.UTC)
    registry = Registry.for_settings(settings, clients)
    out = []
    for name in sorted(config.models):
        model_config = config.models[name]
        try:
            out.append(_tick_model(model_config, registry, clients, settings, now))
        except (ClientError, CanaryError, TransitionError) as exc:
            logger.error("canary tick failed", extra={"model": name, "error": str(exc)})
            out.append(TickResult(name, None, "error", str(exc)))
    return out


def _tick_model(model_config: ModelConfig, registry: Registry, clients: AwsClients,
                settings: Settings, now: dt.datetime) -> TickResult:
    name = model_config.name
    current = registry.current_release(name)
    release = (current.release or {}) if current else {}
    if current is None or not release.get("job_id") or release.get("auto_rollback"):
        return TickResult(name, current.version if current else None, WAIT, "nothing to judge")
    iot = clients.iot
    job_id = str(release["job_id"])
    job = iot.describe_job(jobId=job_id)["job"]
    if release.get("phase") == "canary":
        devices = _job_devices(iot, job_id)
        verdict = judge(devices, model_config.canary, age_minutes=_age_minutes(current, now),
                        job_status=job.get("status", ""), job_reason=job.get("reasonCode") or "")
        logger.info("canary verdict", extra={"model": name, "version": current.version,
                                             "decision": verdict.decision,
                                             "reason": verdict.reason, **verdict.figures})
        if verdict.decision == PROMOTE:
            return _promote(model_config, current, job_id, verdict, registry, clients, settings)
        if verdict.decision == ABORT:
            return _roll_back(model_config, current, job_id, f"canary aborted: {verdict.reason}",
                              verdict.figures, registry, clients, settings)
        return TickResult(name, current.version, WAIT, verdict.reason, job_id)
    if job.get("status") == "CANCELED" and job.get("reasonCode") == "ABORTED":
        reason = f"fleet rollout aborted by its abort config: {job.get('comment') or ''}".strip()
        return _roll_back(model_config, current, job_id, reason, job.get("jobProcessDetails", {}),
                          registry, clients, settings)
    return TickResult(name, current.version, WAIT, f"fleet job {job.get('status')}", job_id)


def _promote(model_config: ModelConfig, current: VersionRecord, canary_job: str,
             verdict: Verdict, registry: Registry, clients: AwsClients,
             settings: Settings) -> TickResult:
    iot = clients.iot
    document = json.loads(iot.get_job_document(jobId=canary_job)["document"])
    document.pop("health", None)  # the fleet is not asked for health reports
    # A release retry's canary is promoted to a fleet job of the same attempt: the
    # version's plain job id may belong to an earlier, cancelled job.
    attempt = (current.release or {}).get("attempt")
    fleet_job = iot_job_id(model_config.name, current.version,
                           attempt=str(attempt) if attempt else None)
    ota.ensure_update_job(iot, job_id=fleet_job, document=document, model_config=model_config,
                          presign_role_arn=settings.iot_presign_role_arn, stage=settings.stage,
                          version=current.version)
    registry.update_release(
        model_config.name, current.version,
        {"phase": "fleet", "job_id": fleet_job, "canary_job_id": canary_job,
         "canary": {"verdict": verdict.reason, **verdict.figures, "at": now_iso()}},
        reason=f"canary healthy ({verdict.reason}): released to {model_config.thing_group}")
    replaced = (current.release or {}).get("replaced_version")
    if replaced is not None:
        previous = registry.get(model_config.name, int(replaced))
        for old_job in {(previous.release or {}).get("job_id"),
                        (previous.release or {}).get("canary_job_id")} - {None}:
            ota.cancel_queued(iot, str(old_job), f"replaced by v{current.version}")
    logger.info("canary promoted", extra={"model": model_config.name,
                                          "version": current.version, "job_id": fleet_job})
    return TickResult(model_config.name, current.version, PROMOTE, verdict.reason, fleet_job)


def _roll_back(model_config: ModelConfig, current: VersionRecord, job_id: str, reason: str,
               figures: dict[str, Any], registry: Registry, clients: AwsClients,
               settings: Settings) -> TickResult:
    name, version = model_config.name, current.version
    try:
        clients.iot.cancel_job(jobId=job_id, reasonCode="UNHEALTHY", comment=reason[:2028],
                               force=False)
    except ClientError as exc:
        if error_code(exc) not in ("InvalidStateTransitionException", "ResourceNotFoundException"):
            raise
    # Back to what the fleet ran before this release (else the newest earlier release).
    replaced = (current.release or {}).get("replaced_version")
    previous = ([registry.get(name, int(replaced))] if replaced is not None else
                [r for r in registry.release_history(name, limit=100)
                 if r.version != version and r.status in RELEASED_AT_SOME_POINT])
    registry.update_release(name, version, {"auto_rollback": {
        "reason": reason, "at": now_iso(), "figures": figures,
        "to_version": previous[0].version if previous else None}}, reason=reason)
    if not previous:
        logger.warning("bad first release: nothing to roll back to",
                       extra={"model": name, "version": version, "reason": reason})
        return TickResult(name, version, ABORT, reason + " (no earlier release to go back to)",
                          job_id)
    target = previous[0]
    artifact = target.artifact or ""
    detail = model_approved_detail(name, target.version, artifact, manual=False, rollback=True,
                                   replaces=version, reason=f"automatic rollback: {reason}",
                                   # its own job, like an operator's rollback: a rollback
                                   # to this version may have been cancelled before
                                   attempt=new_attempt())
    emit_model_approved(clients.events, settings, detail)
    logger.warning("automatic rollback", extra={"model": name, "from": version,
                                                "to": target.version, "reason": reason})
    return TickResult(name, version, ABORT, reason, job_id)
