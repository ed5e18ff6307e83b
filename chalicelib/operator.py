"""Operator controls, shared by the `mledge` CLI and the HTTP routes.

Read the fleet's state (models, versions, one version's lineage, gate reasons and
history), start a training, promote a rejected version (a recorded manual
override) and roll a model back to an older release. Every function raises
`UnknownModelError` / `UnknownVersionError` (404) or `ConflictError` (409) with a
one-line message; callers only format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from chalicelib import trigger
from chalicelib.aws import AwsClients
from chalicelib.backends import TrainingBackend
from chalicelib.config import PipelineConfig
from chalicelib.model_events import (
    announce_approval_once,
    approval_announced,
    emit_model_approved,
    model_approved_detail,
    training_artifact_uri,
)
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
                training_version=lock.version if lock else None,
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
        detail = model_approved_detail(model, target.version, self._artifact(target),
                                       manual=True, rollback=True, replaces=current.version,
                                       reason=why)
        event_id = emit_model_approved(self.clients.events, self.settings, detail)
        self.registry.note(model, target.version,
                           f"rollback to v{target.version} (from v{current.version}) requested "
                           f"by {actor}: {why}")
        return RollbackRequest(model, target.version, current.version, detail["artifact"],
                               event_id, why)

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
