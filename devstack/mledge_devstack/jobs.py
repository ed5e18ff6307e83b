"""The AWS IoT Jobs data plane that moto lacks, answering devices over MQTT.

moto records jobs created through the IoT API but neither expands thing-group
targets into executions nor has a device-side (MQTT) API. `JobsEngine` runs in
the moto server's own process and works directly on moto's IoT backend, so the
executions it creates and updates are what the IoT API then reports:
`list_job_executions_for_job`, `describe_job_execution`, `describe_job`'s
`jobProcessDetails`, and `cancel_job` / `cancel_job_execution` act on them.

What it does (AWS IoT Jobs semantics, checked against the developer guide):
- expands thing and thing-group targets into one execution per thing
  (`CONTINUOUS` jobs pick up things added to the group later);
- answers `start-next`, `get` (pending list), `<jobId>/get` (also `$next`) and
  `<jobId>/update` on `.../accepted` / `.../rejected` with AWS's payloads;
  `expectedVersion` conflicts are rejected with `VersionMismatch`;
- validates requests as AWS documents them (`mledge_update.iot_jobs`): statusDetails
  (at most 10 entries, key and value patterns and lengths), `expectedVersion` and
  `executionNumber` (integers), `stepTimeoutInMinutes` (-1 or 1-10,080), the include
  flags (booleans); anything else is answered `InvalidRequest` and changes nothing;
- publishes `notify-next` whenever a thing's next pending execution changes;
- resolves `${aws:iot:s3-presigned-url:...}` placeholders when it hands out a
  job document;
- validates a request completely before it changes anything: a rejected
  update (bad `expectedVersion`, `executionNumber`, `stepTimeoutInMinutes`,
  `statusDetails`, a version conflict, a terminal execution) leaves the
  execution as it was;
- honours job cancel (QUEUED executions, IN_PROGRESS ones too with force),
  execution cancel (a terminal execution cannot be canceled: the IoT API
  answers `InvalidStateTransitionException`, as AWS does), in-progress and step
  timeouts (TIMED_OUT), the retry config (a FAILED/TIMED_OUT execution is queued
  again with the next executionNumber; the earlier attempts stay describable by
  their executionNumber) and the abort config (per failure type: the job is
  canceled once that type's share of the executed things reaches the threshold
  after at least `minNumberOfExecutedThings` have executed);
- applies the rollout config (`rollout.RolloutGate`): at most
  `maximumPerMinute` (default 1000) things are notified in any minute, and with
  `exponentialRate` the rate starts at `baseRatePerMinute` and is multiplied by
  `incrementFactor` each time another `numberOfNotifiedThings` /
  `numberOfSucceededThings` is reached; a thing not yet reached has no execution;
- serves a thing's pending jobs IN_PROGRESS first, then QUEUED in the order
  they were queued and, for the same instant, in the order the jobs were
  created (not by job id);
- keeps `describe_job`'s counts and the job status (IN_PROGRESS -> COMPLETED)
  current.

Not simulated: the `.../jobs/notify` topic and scheduling windows.

Thread safety: every public method takes one lock; moto's own request threads
(cancel calls) write only `status`/`force_canceled` fields, which `sync` reads.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

from mledge_update.iot_jobs import (
    InvalidJobsRequestError,
    check_bool,
    check_long,
    check_status_details,
    check_step_timeout,
)
from mledge_update.topics import JOBS_REQUEST_FILTERS, jobs_topic_root

from mledge_devstack.rollout import RolloutGate

log = logging.getLogger(__name__)

QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
CANCELED, TIMED_OUT, REMOVED = "CANCELED", "TIMED_OUT", "REMOVED"
PENDING = (IN_PROGRESS, QUEUED)
TERMINAL = (SUCCEEDED, FAILED, REJECTED, CANCELED, TIMED_OUT, REMOVED)
DEVICE_SETTABLE = (IN_PROGRESS, SUCCEEDED, FAILED, REJECTED)

PRESIGNED_PLACEHOLDER = re.compile(r"\$\{aws:iot:s3-presigned-url:([^}]+)\}")
REQUEST_TOPIC = re.compile(
    r"^\$aws/things/(?P<thing>[^/]+)/jobs/(?:(?P<pending>get)|(?P<start>start-next)|"
    r"(?P<job>[^/]+)/(?P<op>get|update))$"
)
# The request filters the bridge subscribes to (precise, so it never hears its own replies).
REQUEST_FILTERS = JOBS_REQUEST_FILTERS

Presigner = Callable[[str, str, int], str]  # (bucket, key, expires_in_seconds) -> URL


class JobsRejectedError(Exception):
    """A device request that AWS would answer on `.../rejected` with this code."""

    def __init__(self, code: str, message: str, execution_state: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.execution_state = code, message, execution_state


@dataclass(frozen=True)
class Outgoing:
    """A message the bridge must publish."""

    topic: str
    payload: dict[str, Any]


@dataclass
class _Meta:
    """What the engine keeps beside moto's execution object."""

    thing_arn: str
    started: bool = False
    step_deadline: float | None = None
    retries: dict[str, int] = field(default_factory=dict)
    last_status: str = QUEUED  # to notice cancels made through the IoT API
    # Earlier attempts of a retried execution, by executionNumber (frozen copies).
    attempts: dict[int, Any] = field(default_factory=dict)


_UNSET = object()


def _int_field(request: dict[str, Any], name: str) -> int | None:
    """An optional integer request field; anything else is AWS's InvalidRequest."""
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobsRejectedError("InvalidRequest", f"{name} must be an integer, got {value!r}")
    return value


def _epoch(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _now_dt(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC).replace(tzinfo=None)  # moto stores naive UTC


def _thing_name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def parse_presigned_source(url: str) -> tuple[str, str]:
    """(bucket, key) of an S3 URL in path style or virtual-hosted style."""
    parsed = urlparse(url)
    host = parsed.netloc
    path = unquote(parsed.path.lstrip("/"))
    virtual = re.match(r"^(?P<bucket>.+)\.s3[.-]", host)
    if virtual:
        return virtual.group("bucket"), path
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise ValueError(f"not an S3 object URL: {url}")
    return bucket, key


def resolve_placeholders(document: Any, presign: Presigner, expires_in: int) -> Any:
    """A copy of `document` with every presigned-URL placeholder replaced by a URL."""

    def one(match: re.Match[str]) -> str:
        bucket, key = parse_presigned_source(match.group(1))
        return presign(bucket, key, expires_in)

    if isinstance(document, str):
        return PRESIGNED_PLACEHOLDER.sub(one, document)
    if isinstance(document, list):
        return [resolve_placeholders(item, presign, expires_in) for item in document]
    if isinstance(document, dict):
        return {k: resolve_placeholders(v, presign, expires_in) for k, v in document.items()}
    return document


class JobsEngine:
    """IoT Jobs executions over one moto `IoTBackend` (its `jobs` and `job_executions`)."""

    def __init__(self, backend: Any, presign: Presigner, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.presign = presign
        self.clock = clock
        self._lock = threading.RLock()
        self._meta: dict[tuple[str, str], _Meta] = {}
        self._expanded: set[str] = set()
        self._notified_next: dict[str, tuple[str, int] | None] = {}
        self._created: dict[str, int] = {}  # job id -> creation order (moto keeps seconds only)
        self._gates: dict[str, RolloutGate] = {}
        # Indexes over _meta, so a device request costs O(its thing's jobs), not O(fleet).
        self._things_of_job: dict[str, set[str]] = {}
        self._jobs_of_thing: dict[str, set[str]] = {}
        self._guard_backend()

    def _guard_backend(self) -> None:
        """Make moto's IoT API refuse what AWS refuses on executions the engine owns."""
        from moto.iot.exceptions import InvalidStateTransitionException, ResourceNotFoundException

        cancel, describe = self.backend.cancel_job_execution, self.backend.describe_job_execution

        def cancel_job_execution(job_id: str, thing_name: str, force: bool) -> None:
            with self._lock:
                ex = self.backend.job_executions.get((job_id, thing_name))
                if ex is not None and ex.status in TERMINAL:
                    raise InvalidStateTransitionException(
                        f"job execution {job_id}/{thing_name} is {ex.status} (terminal)")
                return cancel(job_id, thing_name, force)

        def describe_job_execution(job_id: str, thing_name: str, execution_number: int | None) -> Any:
            with self._lock:
                meta = self._meta.get((job_id, thing_name))
                if (meta is not None and execution_number is not None
                        and int(execution_number) in meta.attempts):
                    return meta.attempts[int(execution_number)]
                ex = self.backend.job_executions.get((job_id, thing_name))
                if ex is None and (job_id, thing_name) not in self._meta:
                    raise ResourceNotFoundException()
                return describe(job_id, thing_name, execution_number)

        self.backend.cancel_job_execution = cancel_job_execution
        self.backend.describe_job_execution = describe_job_execution

    # ------------------------------------------------------------------ queries

    def execution_states(self, job_id: str) -> dict[str, str]:
        """thing name -> execution status, for one job."""
        with self._lock:
            return {thing: ex.status for thing, ex in self._job_executions(job_id)}

    # ------------------------------------------------------------- periodic sync

    def sync(self) -> list[Outgoing]:
        """Pick up new jobs and things, cancels, timeouts; returns notify-next messages."""
        with self._lock:
            now = self.clock()
            for job in list(self.backend.jobs.values()):
                self._expand(job, now)
            self._forget_deleted_jobs()
            for job in list(self.backend.jobs.values()):
                if job.status == CANCELED:
                    self._cancel_pending(job, now)
            for (job_id, thing), ex in self._executions():
                meta = self._meta[(job_id, thing)]
                if ex.status == CANCELED and meta.last_status != CANCELED:
                    meta.last_status = CANCELED  # canceled through the IoT API
                    ex.last_updated_at = _now_dt(now)
                elif ex.status == IN_PROGRESS and self._timed_out(job_id, meta, ex, now):
                    self._finish(job_id, thing, TIMED_OUT, now)
            for job in list(self.backend.jobs.values()):
                self._refresh_job(job, now)
            return self._notify_changes(now)

    def _executions(self) -> Iterator[tuple[tuple[str, str], Any]]:
        for key, ex in list(self.backend.job_executions.items()):
            if key in self._meta:
                yield key, ex

    def _job_executions(self, job_id: str) -> Iterator[tuple[str, Any]]:
        for thing in list(self._things_of_job.get(job_id, ())):
            ex = self.backend.job_executions.get((job_id, thing))
            if ex is not None:
                yield thing, ex

    def _track(self, job_id: str, thing: str, meta: _Meta) -> None:
        self._meta[(job_id, thing)] = meta
        self._things_of_job.setdefault(job_id, set()).add(thing)
        self._jobs_of_thing.setdefault(thing, set()).add(job_id)

    def _untrack(self, key: tuple[str, str]) -> None:
        del self._meta[key]
        self._things_of_job.get(key[0], set()).discard(key[1])
        self._jobs_of_thing.get(key[1], set()).discard(key[0])

    def _expand(self, job: Any, now: float) -> None:
        self._created.setdefault(job.job_id, len(self._created))
        if job.job_id in self._expanded and job.target_selection != "CONTINUOUS":
            self._release(job, now)
            return
        if job.status == CANCELED and job.job_id not in self._expanded:
            self._expanded.add(job.job_id)
            return
        gate = self._gates.get(job.job_id)
        if gate is None:
            gate = self._gates[job.job_id] = RolloutGate.from_config(
                job.job_executions_rollout_config, now)
        for target in job.targets:
            if ":thinggroup/" in target:
                group = _thing_name(target)
                bogus = self.backend.job_executions.get((job.job_id, group))
                if bogus is not None and bogus.thing_arn == target:
                    # moto makes an "execution" for the group ARN as if it were a thing.
                    del self.backend.job_executions[(job.job_id, group)]
                try:
                    things = [(t.thing_name, t.arn) for t in
                              self.backend.list_things_in_thing_group(group)]
                except Exception:  # group deleted meanwhile: AWS would not target it either
                    log.warning("job %s: thing group %s not found", job.job_id, group)
                    things = []
            else:
                things = [(_thing_name(target), target)]
            for thing, arn in things:
                key = (job.job_id, thing)
                if key in self._meta:
                    continue
                if job.job_id not in self._expanded:
                    # moto made an execution per thing target at once; AWS makes it when
                    # the rollout reaches the thing.
                    self.backend.job_executions.pop(key, None)
                gate.add(thing, arn)
        self._expanded.add(job.job_id)
        if job.status == QUEUED:
            job.status = IN_PROGRESS  # AWS reports a created job as IN_PROGRESS
            job.last_updated_at = _now_dt(now)
        self._release(job, now)

    def _release(self, job: Any, now: float) -> None:
        """Create the executions the rollout rate allows now."""
        gate = self._gates.get(job.job_id)
        if gate is None or job.status != IN_PROGRESS:
            return
        from moto.iot.models import FakeJobExecution

        succeeded = sum(1 for _t, ex in self._job_executions(job.job_id) if ex.status == SUCCEEDED)
        for thing, arn in gate.release(now, succeeded):
            key = (job.job_id, thing)
            ex: Any = FakeJobExecution(job.job_id, arn)  # fields set the AWS way below
            self.backend.job_executions[key] = ex
            # moto fills placeholders (123); start the way AWS does.
            ex.status, ex.status_details_map = QUEUED, {}
            ex.execution_number, ex.version_number = 1, 1
            ex.queued_at = ex.last_updated_at = _now_dt(now)
            ex.started_at = None
            ex.approximate_seconds_before_time_out = None
            self._track(job.job_id, thing, _Meta(thing_arn=arn))

    def _forget_deleted_jobs(self) -> None:
        for key in list(self._meta):
            if key[0] not in self.backend.jobs or key not in self.backend.job_executions:
                self._untrack(key)
        self._expanded &= set(self.backend.jobs)
        for job_id in list(self._gates):
            if job_id not in self.backend.jobs:
                del self._gates[job_id]

    def _cancel_pending(self, job: Any, now: float) -> None:
        gate = self._gates.get(job.job_id)
        if gate is not None:
            gate.stop()  # things the rollout had not reached never get an execution
        job_id = job.job_id
        for thing, ex in self._job_executions(job_id):
            if ex.status == QUEUED or (ex.status == IN_PROGRESS and job.force):
                ex.status = CANCELED
                ex.force_canceled = ex.force_canceled or bool(job.force)
                ex.last_updated_at = _now_dt(now)
                self._meta[(job_id, thing)].last_status = CANCELED

    def _timed_out(self, job_id: str, meta: _Meta, ex: Any, now: float) -> bool:
        deadlines = []
        if meta.step_deadline is not None:
            deadlines.append(meta.step_deadline)
        job = self.backend.jobs.get(job_id)
        minutes = (job.timeout_config or {}).get("inProgressTimeoutInMinutes") if job else None
        started = _epoch(ex.started_at)
        if minutes and started is not None:
            deadlines.append(started + float(minutes) * 60)
        return bool(deadlines) and now >= min(deadlines)

    def _refresh_job(self, job: Any, now: float) -> None:
        counts = dict.fromkeys(
            (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, CANCELED, TIMED_OUT, REMOVED), 0)
        total = 0
        for _thing, ex in self._job_executions(job.job_id):
            counts[ex.status] = counts.get(ex.status, 0) + 1
            total += 1
        job.job_process_details = {
            "processingTargets": list(job.targets),
            "numberOfQueuedThings": counts[QUEUED],
            "numberOfInProgressThings": counts[IN_PROGRESS],
            "numberOfSucceededThings": counts[SUCCEEDED],
            "numberOfFailedThings": counts[FAILED],
            "numberOfRejectedThings": counts[REJECTED],
            "numberOfCanceledThings": counts[CANCELED],
            "numberOfTimedOutThings": counts[TIMED_OUT],
            "numberOfRemovedThings": counts[REMOVED],
        }
        pending = counts[QUEUED] + counts[IN_PROGRESS]
        gate = self._gates.get(job.job_id)
        if gate is not None:
            pending += gate.waiting
        if (job.status == IN_PROGRESS and job.target_selection != "CONTINUOUS"
                and total > 0 and pending == 0):
            job.status = "COMPLETED"
            job.completed_at = job.last_updated_at = _now_dt(now)

    # ------------------------------------------------------------ state changes

    def _finish(self, job_id: str, thing: str, status: str, now: float) -> None:
        """Move an execution to a terminal status; apply the retry and abort configs."""
        ex = self.backend.job_executions[(job_id, thing)]
        meta = self._meta[(job_id, thing)]
        ex.status = status
        ex.version_number += 1
        ex.last_updated_at = _now_dt(now)
        meta.last_status = status
        meta.step_deadline = None
        job = self.backend.jobs.get(job_id)
        if job is None:
            return
        if status in (FAILED, TIMED_OUT) and self._retry(job, ex, meta, status, now):
            return
        self._apply_abort(job, now)

    def _retry(self, job: Any, ex: Any, meta: _Meta, status: str, now: float) -> bool:
        criteria = (job.job_execution_retry_config or {}).get("criteriaList") or []
        allowed = sum(int(c.get("numberOfRetries", 0)) for c in criteria
                      if c.get("failureType") in (status, "ALL"))
        used = meta.retries.get(status, 0)
        if job.status != IN_PROGRESS or used >= allowed:
            return False
        meta.retries[status] = used + 1
        earlier = copy.copy(ex)
        earlier.status_details_map = dict(ex.status_details_map)
        meta.attempts[ex.execution_number] = earlier
        # A retry is a new execution of the same job for the thing (AWS: executionNumber + 1).
        ex.status, ex.status_details_map = QUEUED, {}
        ex.execution_number += 1
        ex.version_number = 1
        ex.queued_at = ex.last_updated_at = _now_dt(now)
        ex.started_at = None
        meta.started, meta.last_status = False, QUEUED
        return True

    def _apply_abort(self, job: Any, now: float) -> None:
        criteria = (job.abort_config or {}).get("criteriaList") or []
        if job.status != IN_PROGRESS or not criteria:
            return
        statuses = [ex.status for _t, ex in self._job_executions(job.job_id)]
        executed = [s for s in statuses if s in (SUCCEEDED, FAILED, REJECTED, TIMED_OUT)]
        for criterion in criteria:
            kind = criterion.get("failureType", "ALL")
            failed = [s for s in executed
                      if (kind == "ALL" and s != SUCCEEDED) or s == kind]
            minimum = int(criterion.get("minNumberOfExecutedThings", 1))
            threshold = float(criterion.get("thresholdPercentage", 100.0))
            if len(executed) >= minimum and 100.0 * len(failed) / len(executed) >= threshold:
                job.status = CANCELED
                job.reason_code = "ABORTED"
                job.comment = (f"abort config: {len(failed)} of {len(executed)} executed things "
                               f"{kind} (threshold {threshold}%)")
                job.last_updated_at = _now_dt(now)
                log.info("job %s aborted: %s", job.job_id, job.comment)
                self._cancel_pending(job, now)
                return

    # --------------------------------------------------------------- documents

    def _document(self, job_id: str) -> Any:
        job = self.backend.jobs[job_id]
        raw = job.document or "{}"
        try:
            document = json.loads(raw)
        except json.JSONDecodeError:
            document = raw
        expires = int((job.presigned_url_config or {}).get("expiresInSec", 3600))
        return resolve_placeholders(document, self.presign, expires)

    def _execution(self, job_id: str, thing: str, *, document: bool,
                   attempt: Any = None) -> dict[str, Any]:
        ex = attempt if attempt is not None else self.backend.job_executions[(job_id, thing)]
        out: dict[str, Any] = {
            "jobId": job_id,
            "thingName": thing,
            "status": ex.status,
            "statusDetails": dict(ex.status_details_map),
            "queuedAt": _epoch(ex.queued_at),
            "lastUpdatedAt": _epoch(ex.last_updated_at),
            "versionNumber": ex.version_number,
            "executionNumber": ex.execution_number,
        }
        if ex.started_at is not None:
            out["startedAt"] = _epoch(ex.started_at)
        if document:
            out["jobDocument"] = self._document(job_id)
        return out

    def _summary(self, job_id: str, thing: str) -> dict[str, Any]:
        full = self._execution(job_id, thing, document=False)
        return {k: full[k] for k in ("jobId", "queuedAt", "startedAt", "lastUpdatedAt",
                                     "versionNumber", "executionNumber") if k in full}

    @staticmethod
    def _state(ex: Any) -> dict[str, Any]:
        return {"status": ex.status, "statusDetails": dict(ex.status_details_map),
                "versionNumber": ex.version_number}

    # ------------------------------------------------------------------- next

    def _pending(self, thing: str) -> list[str]:
        """The thing's pending job ids: IN_PROGRESS first, then QUEUED, oldest first."""
        rows = []
        for job_id in list(self._jobs_of_thing.get(thing, ())):
            ex = self.backend.job_executions.get((job_id, thing))
            if ex is not None and ex.status in PENDING and job_id in self.backend.jobs:
                rows.append((PENDING.index(ex.status), ex.queued_at,
                             self._created.get(job_id, 0), job_id))
        return [job_id for *_ignored, job_id in sorted(rows)]

    def _notify_changes(self, now: float, things: set[str] | None = None) -> list[Outgoing]:
        """notify-next for every thing (or just `things`) whose next execution changed."""
        if things is None:
            things = set(self._jobs_of_thing) | set(self._notified_next)
        by_thing = {thing: self._pending(thing) for thing in things}
        out = []
        for thing in sorted(things):
            pending = by_thing.get(thing, [])
            current = None
            if pending:
                current = (pending[0], self.backend.job_executions[(pending[0], thing)]
                           .execution_number)
            if self._notified_next.get(thing, None) == current:
                continue
            if current is None and thing not in self._notified_next:
                continue
            self._notified_next[thing] = current
            payload: dict[str, Any] = {"timestamp": int(now)}
            if current is not None:
                payload["execution"] = self._execution(current[0], thing, document=True)
            out.append(Outgoing(f"{jobs_topic_root(thing)}/notify-next", payload))
        return out

    # ----------------------------------------------------------- device requests

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Answer one device request; returns the reply (+ any notify-next) to publish."""
        match = REQUEST_TOPIC.match(topic)
        if match is None:
            return []
        thing = match.group("thing")
        request: dict[str, Any] = {}
        early: list[Outgoing] = []
        with self._lock:
            now = self.clock()
            try:
                try:
                    request = json.loads(payload or b"{}")
                except ValueError as exc:  # not UTF-8, not JSON, a number past the digit limit
                    raise JobsRejectedError("InvalidJson", f"payload is not JSON: {exc}") from None
                except RecursionError:
                    raise JobsRejectedError("InvalidJson", "payload nests too deeply") from None
                if not isinstance(request, dict):
                    request = {}
                    raise JobsRejectedError("InvalidJson", "payload must be a JSON object")
                if any(job_id not in self._expanded for job_id in self.backend.jobs):
                    early = self.sync()  # a job created a moment ago is visible at once
                try:
                    self._check_request(request)
                except InvalidJobsRequestError as exc:
                    raise JobsRejectedError("InvalidRequest", str(exc)) from None
                if match.group("start"):
                    body = self._start_next(thing, request, now)
                elif match.group("pending"):
                    body = self._get_pending(thing)
                elif match.group("op") == "get":
                    body = self._describe(thing, match.group("job"), request)
                else:
                    body = self._update(thing, match.group("job"), request, now)
                reply = Outgoing(f"{topic}/accepted", self._stamp(body, request, now))
            except JobsRejectedError as exc:
                body = {"code": exc.code, "message": exc.message}
                if exc.execution_state is not None:
                    body["executionState"] = exc.execution_state
                reply = Outgoing(f"{topic}/rejected", self._stamp(body, request, now))
            # Only the jobs this thing has can have changed (the 1 s sync does the rest).
            for job_id in list(self._jobs_of_thing.get(thing, ())):
                job = self.backend.jobs.get(job_id)
                if job is not None:
                    self._refresh_job(job, now)
            return [*early, reply, *self._notify_changes(now, {thing})]

    @staticmethod
    def _check_request(request: dict[str, Any]) -> None:
        """Every field AWS validates, before anything changes (a rejected request changes nothing)."""
        # JSON null is an absent field, as in AWS's JSON protocol.
        if request.get("statusDetails") is not None:
            check_status_details(request["statusDetails"])
        for name in ("expectedVersion", "executionNumber"):
            if request.get(name) is not None:
                check_long(request[name], name)
        if request.get("stepTimeoutInMinutes") is not None:
            check_step_timeout(request["stepTimeoutInMinutes"])
        for name in ("includeJobExecutionState", "includeJobDocument"):
            if request.get(name) is not None:
                check_bool(request[name], name)

    @staticmethod
    def _stamp(body: dict[str, Any], request: dict[str, Any], now: float) -> dict[str, Any]:
        body["timestamp"] = int(now)
        if "clientToken" in request:
            body["clientToken"] = request["clientToken"]
        return body

    def _require(self, thing: str, job_id: str, request: dict[str, Any]) -> tuple[str, Any] | None:
        """(job id, an earlier attempt or None) of the execution a request names."""
        number = _int_field(request, "executionNumber")
        if job_id == "$next":
            pending = self._pending(thing)
            if not pending:
                return None
            job_id = pending[0]
        key = (job_id, thing)
        if key not in self._meta or job_id not in self.backend.jobs:
            raise JobsRejectedError("ResourceNotFound",
                                    f"no execution of job {job_id} for thing {thing}")
        ex = self.backend.job_executions[key]
        if number is not None and number != ex.execution_number:
            earlier = self._meta[key].attempts.get(number)
            if earlier is None:
                raise JobsRejectedError(
                    "ResourceNotFound", f"job {job_id} has no execution number {number} for {thing}")
            return job_id, earlier
        return job_id, None

    @staticmethod
    def _step_minutes(request: dict[str, Any]) -> Any:
        """The request's stepTimeoutInMinutes (validated), or _UNSET."""
        if request.get("stepTimeoutInMinutes") is None:
            return _UNSET
        minutes = _int_field(request, "stepTimeoutInMinutes")
        if minutes is None or not (minutes == -1 or 1 <= minutes <= 10080):
            raise JobsRejectedError("InvalidRequest",
                                    "stepTimeoutInMinutes must be -1 or 1 to 10080")
        return minutes

    @staticmethod
    def _apply_step_timeout(meta: _Meta, minutes: Any, now: float) -> None:
        if minutes is not _UNSET:
            meta.step_deadline = None if minutes == -1 else now + minutes * 60

    @staticmethod
    def _status_details(request: dict[str, Any]) -> dict[str, str] | None:
        details = request.get("statusDetails")  # checked by _check_request
        return None if details is None else dict(details)

    def _start_next(self, thing: str, request: dict[str, Any], now: float) -> dict[str, Any]:
        details = self._status_details(request)
        minutes = self._step_minutes(request)
        pending = self._pending(thing)
        if not pending:
            return {}
        job_id = pending[0]
        ex = self.backend.job_executions[(job_id, thing)]
        meta = self._meta[(job_id, thing)]
        if ex.status == QUEUED:
            self._apply_step_timeout(meta, minutes, now)
            ex.status = IN_PROGRESS
            ex.version_number += 1
            ex.started_at = ex.last_updated_at = _now_dt(now)
            if details is not None:
                ex.status_details_map = details
            meta.started, meta.last_status = True, IN_PROGRESS
        return {"execution": self._execution(job_id, thing, document=True)}

    def _get_pending(self, thing: str) -> dict[str, Any]:
        in_progress: list[dict[str, Any]] = []
        queued: list[dict[str, Any]] = []
        for job_id in self._pending(thing):
            ex = self.backend.job_executions[(job_id, thing)]
            (in_progress if ex.status == IN_PROGRESS else queued).append(
                self._summary(job_id, thing))
        return {"inProgressJobs": in_progress, "queuedJobs": queued}

    def _describe(self, thing: str, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        found = self._require(thing, job_id, request)
        if found is None:
            return {}
        resolved, attempt = found
        include = request.get("includeJobDocument", True) is not False
        return {"execution": self._execution(resolved, thing, document=include, attempt=attempt)}

    def _update(self, thing: str, job_id: str, request: dict[str, Any],
                now: float) -> dict[str, Any]:
        # Everything is checked before anything changes: a rejected update changes nothing.
        status = request.get("status")
        if status not in DEVICE_SETTABLE:
            raise JobsRejectedError(
                "InvalidRequest", f"status must be one of {', '.join(DEVICE_SETTABLE)}, got {status!r}")
        details = self._status_details(request)
        expected = _int_field(request, "expectedVersion")
        minutes = self._step_minutes(request)
        found = self._require(thing, job_id, request)
        if found is None:
            raise JobsRejectedError("ResourceNotFound", f"no pending job execution for {thing}")
        resolved, attempt = found
        key = (resolved, thing)
        ex = attempt if attempt is not None else self.backend.job_executions[key]
        meta = self._meta[key]
        if expected is not None and expected != ex.version_number:
            raise JobsRejectedError(
                "VersionMismatch",
                f"expectedVersion {expected} but the execution is at version {ex.version_number}",
                self._state(ex))
        if ex.status in TERMINAL:
            raise JobsRejectedError(
                "InvalidStateTransition",
                f"job execution is {ex.status} (terminal) and cannot become {status}",
                self._state(ex))
        if details is not None:
            ex.status_details_map = details
        if status == IN_PROGRESS:
            self._apply_step_timeout(meta, minutes, now)
            if ex.status == QUEUED:
                ex.started_at = _now_dt(now)
            ex.status = IN_PROGRESS
            ex.version_number += 1
            ex.last_updated_at = _now_dt(now)
            meta.started, meta.last_status = True, IN_PROGRESS
        else:
            if ex.started_at is None:
                ex.started_at = _now_dt(now)
            self._finish(resolved, thing, status, now)
        body: dict[str, Any] = {}
        if request.get("includeJobExecutionState"):
            body["executionState"] = self._state(ex)
        if request.get("includeJobDocument"):
            body["jobDocument"] = self._document(resolved)
        return body
