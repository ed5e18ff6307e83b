"""Operator controls, shared by the `mledge` CLI and the HTTP routes.

Read the fleet's state (models, versions, one version's lineage, gate reasons and
history), start a training, promote a rejected version (a recorded manual
override), roll a model back to an older release, release an approved version
again after its release failed, and label readings as faults or normal. Every function raises
`UnknownModelError` / `UnknownVersionError` (404) or `ConflictError` (409) with a
one-line message; callers only format.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from chalicelib import layout, trigger
from chalicelib.aws import AwsClients
from chalicelib.backends import TrainingBackend
from chalicelib.config import PipelineConfig
from chalicelib.model_events import (
    announce_approval_once,
    approval_announced,
    emit_model_approved,
    model_approved_detail,
    new_attempt,
    training_artifact_uri,
)
from chalicelib.records import MAX_ID_CHARS
from chalicelib.registry import (
    RELEASED_AT_SOME_POINT,
    ConflictError,
    Registry,
    Status,
    TransitionError,
    VersionRecord,
    now_iso,
)
from chalicelib.settings import Settings
from chalicelib.state import StateStore
from chalicelib.trigger import TrainingStart


class NothingToRollBackError(ConflictError):
    """No older released version to roll back to."""


@dataclass(frozen=True)
class ModelSummary:
    model: str
    family: str
    metric: str
    threshold: float
    backend: str
    thing_group: str
    released_version: int | None
    released_score: float | None
    latest_version: int | None
    latest_status: str | None
    training_version: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FleetState:
    """Where the fleet stands on a model's current release (its IoT Job's executions)."""

    model: str
    thing_group: str
    released_version: int | None
    job_id: str | None
    job_status: str | None
    counts: dict[str, int]
    things: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RollbackRequest:
    model: str
    version: int
    replaces: int
    artifact: str
    event_id: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VERDICTS = ("fault", "normal")
MAX_LABELS_PER_CALL = 10_000


@dataclass(frozen=True)
class LabelResult:
    model: str
    verdict: str
    records: int
    key: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReleaseRequest:
    model: str
    version: int
    attempt: str
    event_id: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromoteResult:
    record: VersionRecord
    announced: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "announced": self.announced}


class Operator:
    """The operator's view of one stage."""

    def __init__(self, *, clients: AwsClients, settings: Settings, config: PipelineConfig,
                 registry: Registry | None = None, state: StateStore | None = None,
                 backend_factory: Callable[[str], TrainingBackend] | None = None) -> None:
        self.clients = clients
        self.settings = settings
        self.config = config
        self.backend_factory = backend_factory
        self.registry = registry or Registry.for_settings(settings, clients)
        self.state = state or StateStore.for_settings(settings, clients)

    # -- reading

    def models(self) -> list[ModelSummary]:
        out = []
        for name in sorted(self.config.models):
            cfg = self.config.models[name]
            versions = self.registry.list_versions(name)
            released_version = self.registry.released_version(name)
            released = next((v for v in versions if v.version == released_version), None)
            latest = versions[-1] if versions else None
            lock = self.state.training_lock(name)
            out.append(ModelSummary(
                model=name, family=cfg.family, metric=cfg.metric, threshold=cfg.threshold,
                backend=cfg.training.backend, thing_group=cfg.thing_group,
                released_version=released_version,
                released_score=_score(released, cfg.metric),
                latest_version=latest.version if latest else None,
                latest_status=str(latest.status) if latest else None,
                # An approved version keeps the lock while it is being released: that is
                # not a training in flight.
                training_version=lock.version if lock and any(
                    v.version == lock.version and v.status is Status.TRAINING
                    for v in versions) else None,
            ))
        return out

    def versions(self, model: str) -> list[VersionRecord]:
        self.config.model(model)  # UnknownModelError
        return self.registry.list_versions(model)

    def show(self, model: str, version: int) -> VersionRecord:
        self.config.model(model)
        return self.registry.get(model, version)

    def fleet(self, model: str) -> FleetState:
        """The current release's job: its status and each thing's execution status."""
        cfg = self.config.model(model)
        release = self.registry.current_release(model)
        job_id = (release.release or {}).get("job_id") if release else None
        if release is None or not job_id:
            return FleetState(model, cfg.thing_group, None, None, None, {}, {})
        iot = self.clients.iot
        job = iot.describe_job(jobId=job_id)["job"]
        things: dict[str, str] = {}
        kwargs: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
        while True:
            page = iot.list_job_executions_for_job(**kwargs)
            for execution in page.get("executionSummaries", []):
                thing = str(execution.get("thingArn", "")).rsplit("/", 1)[-1]
                things[thing] = execution.get("jobExecutionSummary", {}).get("status", "UNKNOWN")
            if not page.get("nextToken"):
                break
            kwargs["nextToken"] = page["nextToken"]
        counts: dict[str, int] = {}
        for status in things.values():
            counts[status] = counts.get(status, 0) + 1
        return FleetState(model, cfg.thing_group, release.version, job_id, job.get("status"),
                          dict(sorted(counts.items())), dict(sorted(things.items())))

    # -- acting

    def train(self, model: str, *, reason: str, force: bool = False) -> TrainingStart:
        """Start a training now (the trigger's start_training: lock, snapshot, job).

        Raises the trigger's TrainingInProgressError / NoDataError (conflicts) and
        TrainingStartError (the job did not start; recorded FAILED).
        """
        self.config.model(model)
        return trigger.start_training(model, clients=self.clients, settings=self.settings,
                                      config=self.config, reason=reason, force=force,
                                      registry=self.registry, state=self.state,
                                      backend_factory=self.backend_factory)

    def promote(self, model: str, version: int, *, reason: str, actor: str) -> PromoteResult:
        """REJECTED -> APPROVED as a recorded manual override, then announce ModelApproved.

        An APPROVED version whose approval was never announced (the send failed)
        is announced again; any other status is a conflict.
        """
        self.config.model(model)
        if not reason.strip():
            raise ValueError("promote needs a reason (it is recorded as the override's reason)")
        record = self.registry.get(model, version)
        unannounced = record.status is Status.APPROVED and not approval_announced(
            self.state, model, version)
        if not unannounced:  # an unannounced approval is only announced again, below
            if record.status is not Status.REJECTED:
                raise TransitionError(f"{model} v{version} is {record.status}: only a REJECTED "
                                      f"version can be promoted")
            override = {"by": actor, "reason": reason, "at": now_iso(),
                        "gate_reasons": (record.gate or {}).get("reasons", [])}
            record = self.registry.transition(
                model, version, Status.APPROVED, expected=[Status.REJECTED],
                reason=f"manual promote by {actor}: {reason}", override=override,
            )
        detail = model_approved_detail(model, version, self._artifact(record), manual=True,
                                       reason=reason)
        announced = announce_approval_once(self.state, self.clients.events, self.settings,
                                           detail)
        return PromoteResult(record, announced)

    def rollback(self, model: str, *, to: int | None = None, reason: str = "",
                 actor: str = "operator") -> RollbackRequest:
        """Ask packaging to release an older model again (ModelApproved with rollback: true).

        The target is `to`, else the version released before the current one. The
        registry moves when packaging calls `Registry.mark_released(..., rollback)`.
        """
        self.config.model(model)
        current = self.registry.current_release(model)
        if current is None:
            raise NothingToRollBackError(f"{model} has no release to roll back from")
        if to is not None:
            target = self.registry.get(model, to)
            if target.version == current.version:
                raise ConflictError(f"{model} v{to} is already the current release")
            if target.status not in RELEASED_AT_SOME_POINT:
                raise ConflictError(f"{model} v{to} is {target.status}: only a version that was "
                                    f"released before can be rolled back to")
        else:
            older = [r for r in self.registry.release_history(model, limit=100)
                     if r.version != current.version]
            if not older:
                raise NothingToRollBackError(
                    f"{model} has no earlier release than v{current.version} to roll back to")
            target = older[0]
        why = reason or f"rollback requested by {actor}"
        # Each rollback is its own action with its own job (attempt): going back and forth
        # between two versions must never reuse the id of a job cancelled on the way.
        detail = model_approved_detail(model, target.version, self._artifact(target),
                                       manual=True, rollback=True, replaces=current.version,
                                       reason=why, attempt=new_attempt())
        event_id = emit_model_approved(self.clients.events, self.settings, detail)
        self.registry.note(model, target.version,
                           f"rollback to v{target.version} (from v{current.version}) requested "
                           f"by {actor}: {why}")
        return RollbackRequest(model, target.version, current.version, detail["artifact"],
                               event_id, why)

    def release(self, model: str, version: int, *, reason: str = "",
                actor: str = "operator") -> ReleaseRequest:
        """Run packaging again for an APPROVED version whose release failed (e.g. a bad
        artifact, since fixed), as a new attempt with its own job. Packaging still skips
        it when a newer version was released meanwhile."""
        self.config.model(model)
        record = self.registry.get(model, version)
        if record.status is not Status.APPROVED:
            raise TransitionError(f"{model} v{version} is {record.status}: only an APPROVED "
                                  f"version (whose release failed) can be released again")
        current = self.registry.released_version(model)
        if current is not None and current > version:
            raise ConflictError(f"{model} v{version} is older than the current release "
                                f"v{current}: releases move forward only (roll back instead)")
        why = reason or f"release retry requested by {actor}"
        attempt = new_attempt()
        detail = model_approved_detail(model, version, self._artifact(record),
                                       manual=bool(record.override), reason=why,
                                       attempt=attempt)
        event_id = emit_model_approved(self.clients.events, self.settings, detail)
        self.registry.note(model, version, f"release retry {attempt} requested by {actor}: "
                                           f"{why}")
        return ReleaseRequest(model, version, attempt, event_id, why)

    def label(self, model: str, record_ids: list[str], verdict: str, *, reason: str = "",
              actor: str = "operator") -> LabelResult:
        """Record an operator's verdict ("fault" or "normal") on readings by record id.

        One gzip JSON-lines object under `labels/<model>/`; every later snapshot includes
        it: confirmed faults are kept out of training and every verdict is scored by the
        challenger and the champion (the gate's detection rule). A later verdict on the
        same record wins.
        """
        self.config.model(model)
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        ids = list(dict.fromkeys(record_ids))
        if not ids:
            raise ValueError("label needs at least one record id")
        if len(ids) > MAX_LABELS_PER_CALL:
            raise ValueError(f"at most {MAX_LABELS_PER_CALL} record ids per call, got {len(ids)}")
        for rid in ids:
            if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
                raise ValueError(f"record ids are non-empty strings of at most {MAX_ID_CHARS} "
                                 f"characters, got {rid!r}"[:200])
        now = datetime.now(UTC)
        at = now.isoformat(timespec="milliseconds")
        body = "".join(json.dumps({"verdict_of": rid, "verdict": verdict, "by": actor, "at": at,
                                   "reason": reason}, separators=(",", ":")) + "\n"
                       for rid in ids)
        key = layout.labels_key(model, now, new_attempt())
        self.clients.s3.put_object(Bucket=self.settings.bucket, Key=key,
                                   Body=gzip.compress(body.encode()),
                                   Metadata={"record-count": str(len(ids))})
        return LabelResult(model, verdict, len(ids), key)

    def _artifact(self, record: VersionRecord) -> str:
        if record.artifact:
            return record.artifact
        if not record.job_name:
            raise ConflictError(f"{record.model} v{record.version} has no training artifact "
                                f"recorded")
        return training_artifact_uri(self.settings.bucket, record.model, record.job_name)


def _score(record: VersionRecord | None, metric: str) -> float | None:
    if record is None or not record.metrics:
        return None
    value = (record.metrics.get("challenger") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None
