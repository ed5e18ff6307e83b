"""The AWS IoT Jobs MQTT API, device side.

Topics (all under `$aws/things/<thing>/jobs/`): the device subscribes to
`notify-next` and to the accepted/rejected replies of `start-next`,
`<jobId>/update` and `<jobId>/get`; it publishes `start-next` when it connects
or reconnects (offline catch-up) and whenever `notify-next` says the next job
changed, then runs the job and publishes `<jobId>/update` with `status`,
`statusDetails` and `expectedVersion`.

Replies come from outside: a reply that is not a JSON object, or an execution
without a valid job id, is logged and dropped (a request waiting for it times out);
fields of the wrong type are treated as absent. Updates carry statusDetails that
meet AWS's rules (`mledge_update.iot_jobs`); if IoT Jobs still answers
`InvalidRequest`, the update is sent again with printable-ASCII details, then with
none, so a final status always gets through.

Threading: SDK callbacks only parse the reply and complete a waiting request or
enqueue an event. One worker thread runs start-next and the job itself (long:
downloads), so notifications arriving meanwhile wait in the queue. Every wait
for a reply has a timeout.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mledge_update.iot_jobs import JOB_ID, LONG_MAX, ascii_details
from mledge_update.topics import jobs_topic_root

from .mqtt import MqttLink

log = logging.getLogger(__name__)

IN_PROGRESS = "IN_PROGRESS"
TERMINAL_REJECTION_CODES = ("InvalidStateTransition", "ResourceNotFound", "TerminalStateReached")


class JobsRequestTimeoutError(Exception):
    """No accepted/rejected reply arrived in time."""


class JobCanceledError(Exception):
    """The job execution can no longer be updated (canceled, removed, already terminal)."""


class JobReplyError(ValueError):
    """A reply from IoT Jobs that does not describe a job execution (no valid job id)."""


def _version(value: Any) -> int | None:
    """versionNumber / executionNumber: a non-negative integer, else unknown."""
    return value if type(value) is int and 0 <= value <= LONG_MAX else None


@dataclass
class JobExecution:
    job_id: str
    status: str
    document: dict[str, Any]
    version_number: int | None
    execution_number: int | None = None
    status_details: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, execution: Any) -> JobExecution:
        """Parse a reply's `execution`; JobReplyError when it names no valid job id.

        The job id goes into MQTT topics, so only AWS's job-id pattern is accepted. A
        document that is not an object becomes `{}` (the agent then REJECTS the job).
        """
        if not isinstance(execution, dict):
            raise JobReplyError(f"execution must be an object, got {type(execution).__name__}")
        job_id = execution.get("jobId")
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise JobReplyError(f"execution has no valid jobId: {job_id!r:.80}")
        status = execution.get("status")
        document = execution.get("jobDocument")
        details = execution.get("statusDetails")
        return cls(
            job_id=job_id,
            status=status if isinstance(status, str) else "QUEUED",
            document=document if isinstance(document, dict) else {},
            version_number=_version(execution.get("versionNumber")),
            execution_number=_version(execution.get("executionNumber")),
            status_details={k: v for k, v in details.items()
                            if isinstance(k, str) and isinstance(v, str)}
            if isinstance(details, dict) else {},
        )


@dataclass
class Reply:
    accepted: bool
    payload: dict[str, Any]

    @property
    def code(self) -> str:
        code = self.payload.get("code")
        return code if isinstance(code, str) else ""

    @property
    def message(self) -> str:
        message = self.payload.get("message")
        return message[:300] if isinstance(message, str) else ""


ExecutionHandler = Callable[["JobsClient", JobExecution], None]


class JobsClient:
    def __init__(
        self,
        link: MqttLink,
        thing: str,
        handle_execution: ExecutionHandler,
        *,
        request_timeout_s: float = 10.0,
        before_start_next: Callable[[JobsClient], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        poll_interval_s: float = 300.0,
        retry_interval_s: float = 5.0,
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.retry_interval_s = retry_interval_s
        self.link = link
        self.thing = thing
        self.prefix = jobs_topic_root(thing)
        self.handle_execution = handle_execution
        self.before_start_next = before_start_next
        self.on_idle = on_idle  # called when start-next says nothing is pending
        self.request_timeout_s = request_timeout_s
        self._events: queue.Queue[str] = queue.Queue()
        self._pending: dict[str, tuple[threading.Event, list[Reply]]] = {}
        self._pending_lock = threading.Lock()
        self._versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._tokens = itertools.count()
        self._token_prefix = uuid.uuid4().hex[:8]

    # -- lifecycle ---------------------------------------------------------------
    def subscribe(self) -> None:
        self.link.subscribe(f"{self.prefix}/notify-next", self._on_notify)
        for request in ("start-next", "+/update", "+/get"):
            for outcome in ("accepted", "rejected"):
                self.link.subscribe(f"{self.prefix}/{request}/{outcome}", self._on_reply)

    def start(self) -> None:
        self.subscribe()
        self._worker = threading.Thread(target=self._run, name=f"jobs-{self.thing}", daemon=True)
        self._worker.start()
        self._events.put("start-next")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._events.put("stop")
        if self._worker is not None:
            self._worker.join(timeout_s)

    def connection_resumed(self, session_present: bool) -> None:
        """Called from the SDK callback: queue the catch-up work, never do it here."""
        if not session_present:
            self._events.put("resubscribe")
        self._events.put("start-next")

    # -- SDK callbacks (must not block) -----------------------------------------
    def _on_notify(self, topic: str, payload: bytes) -> None:
        self._events.put("start-next")

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload or b"{}")
        except (ValueError, RecursionError):
            log.warning("unparseable reply on %s", topic)
            return
        if not isinstance(body, dict):
            log.warning("reply on %s is not a JSON object", topic)
            return
        token = body.get("clientToken")
        if not isinstance(token, str):
            return
        with self._pending_lock:
            waiter = self._pending.get(token) if token else None
        if waiter is None:
            return  # someone else's reply (or one that already timed out)
        event, box = waiter
        box.append(Reply(topic.endswith("/accepted"), body))
        event.set()

    # -- requests ----------------------------------------------------------------
    def _request(self, topic: str, body: dict[str, Any], timeout_s: float | None = None) -> Reply:
        token = f"{self._token_prefix}-{next(self._tokens)}"
        body = {**body, "clientToken": token}
        event = threading.Event()
        box: list[Reply] = []
        with self._pending_lock:
            self._pending[token] = (event, box)
        try:
            self.link.publish(topic, json.dumps(body).encode())
            if not event.wait(timeout_s if timeout_s is not None else self.request_timeout_s):
                raise JobsRequestTimeoutError(f"no reply to {topic} within {self.request_timeout_s}s")
            return box[0]
        finally:
            with self._pending_lock:
                self._pending.pop(token, None)

    def start_next(self) -> JobExecution | None:
        reply = self._request(f"{self.prefix}/start-next", {})
        if not reply.accepted:
            log.warning("start-next rejected: %s %s", reply.code, reply.message)
            return None
        execution = reply.payload.get("execution")
        if not execution:
            return None
        try:
            job = JobExecution.from_reply(execution)
        except JobReplyError as exc:
            log.warning("start-next: ignoring an execution IoT Jobs sent: %s", exc)
            return None
        if job.version_number is not None:
            self._versions[job.job_id] = int(job.version_number)
        return job

    def get(self, job_id: str) -> JobExecution | None:
        reply = self._request(f"{self.prefix}/{job_id}/get", {"includeJobDocument": True})
        if not reply.accepted or not reply.payload.get("execution"):
            return None
        try:
            job = JobExecution.from_reply(reply.payload["execution"])
        except JobReplyError as exc:
            log.warning("get %s: ignoring the execution IoT Jobs sent: %s", job_id, exc)
            return None
        if job.version_number is not None:
            self._versions[job_id] = int(job.version_number)
        return job

    def update(self, job_id: str, status: str, details: dict[str, str] | None = None) -> Reply:
        """Publish an update with expectedVersion and return IoT Jobs' reply.

        On VersionMismatch: re-read the execution and retry once. On InvalidRequest
        (AWS refused the statusDetails): retry with printable-ASCII details, then with
        none, so the status itself is never lost. Raises JobCanceledError when the
        execution can no longer change."""
        attempts = [details or None]
        if details:
            attempts += [ascii_details(details) or None, None]
        mismatches = 0
        while attempts:
            sent = attempts[0]
            reply = self._update_once(job_id, status, sent)
            if reply.accepted:
                return reply
            if reply.code == "VersionMismatch" and mismatches == 0:
                mismatches += 1
                self._versions.pop(job_id, None)
                self.get(job_id)
                continue
            if reply.code in TERMINAL_REJECTION_CODES:
                raise JobCanceledError(f"{job_id}: update to {status} rejected: {reply.code}")
            if reply.code != "InvalidRequest":
                return reply
            attempts.pop(0)
            while attempts and attempts[0] == sent:
                attempts.pop(0)  # the fallback would be the same payload
            log.warning("job %s: update to %s refused (InvalidRequest: %s); %s", job_id, status,
                        reply.message, "retrying with sanitized statusDetails" if attempts
                        else "giving up")
        return reply

    def _update_once(self, job_id: str, status: str, details: dict[str, str] | None) -> Reply:
        body: dict[str, Any] = {"status": status, "includeJobExecutionState": True}
        if details:
            body["statusDetails"] = details
        version = self._versions.get(job_id)
        if version is not None:
            body["expectedVersion"] = version
        reply = self._request(f"{self.prefix}/{job_id}/update", body)
        if reply.accepted:
            state = reply.payload.get("executionState")
            number = _version(state.get("versionNumber")) if isinstance(state, dict) else None
            if number is not None:
                self._versions[job_id] = number
        return reply

    # -- worker ------------------------------------------------------------------
    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=max(0.05, min(1.0, next_poll - time.monotonic())))
            except queue.Empty:
                if time.monotonic() < next_poll:
                    continue
                event = "poll"  # no event for a while (or a retry is due): catch up anyway
            if event == "stop":
                break
            try:
                if event == "resubscribe":
                    self.link.resubscribe()
                    continue
                # Coalesce a burst of notifications into one catch-up pass.
                while True:
                    try:
                        extra = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if extra == "stop":
                        return
                    if extra == "resubscribe":
                        self.link.resubscribe()
                self._catch_up()
                next_poll = time.monotonic() + self.poll_interval_s
            except Exception:
                log.exception("jobs worker: %s failed; retrying in %.0fs", event, self.retry_interval_s)
                next_poll = time.monotonic() + self.retry_interval_s

    def _catch_up(self) -> None:
        if self.before_start_next is not None:
            self.before_start_next(self)
        seen: set[tuple[str, str]] = set()
        while not self._stop.is_set():
            job = self.start_next()
            if job is None:
                if self.on_idle is not None:
                    self.on_idle()
                return
            key = (job.job_id, str(job.version_number))
            if key in seen:  # the same execution again unchanged: do not spin on it
                log.warning("job %s still pending after handling; waiting for the next event", job.job_id)
                return
            seen.add(key)
            self.handle_execution(self, job)
