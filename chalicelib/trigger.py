"""The retrain trigger: S3 object-created events, the schedule and the operator.

Three ways in, one way to start a training (`Trigger.start_training`):

1. `handle_raw_events(event)`: S3 `ObjectCreated` notifications for `raw/`
   objects, through the raw-events SQS queue (the body is S3's event JSON) or
   delivered directly (`on_s3_event`). Each object's records are counted once
   (event marker + counter in one DynamoDB transaction; keys are URL-decoded);
   when a model's count reaches `min_new_records`, a training starts.
2. `run_scheduled_trainings()`: on a fixed tick, starts each model whose
   `training.schedule` is due and that has new records.
3. `start_training(model, reason="manual")`: the operator CLI and route.

Starting a training: check the lock, allocate a version (registry), take the
training lock (conditional), write the dataset snapshot, record the version as
TRAINING with its lineage, start the backend job, consume the counted records.
A failure after the lock is taken records the version FAILED with the reason
and releases the lock, so nothing stays stuck.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from mledge_update.naming import make_job_name

from chalicelib import layout
from chalicelib.aws import error_code
from chalicelib.backends import (
    TrainingBackend,
    TrainingRequest,
    backend_for,
    training_hyperparameters,
)
from chalicelib.compaction import compact_model
from chalicelib.config import ModelConfig, PipelineConfig, UnknownModelError
from chalicelib.datasets import EmptyWindowError, build_dataset, default_engine_factory
from chalicelib.observability import PipelineMetrics, correlated
from chalicelib.registry import Registry, Status, TransitionError, UnknownVersionError
from chalicelib.schedule import ScheduleError, schedule_due
from chalicelib.settings import Settings
from chalicelib.snapshot import (
    UnreadableObjectError,
    count_records,
    has_raw_data,
    is_raw_data_key,
    write_snapshot,
)
from chalicelib.state import StateStore
from chalicelib.untrusted import shown

__all__ = [
    "NoDataError",
    "TrainingInProgressError",
    "TrainingStart",
    "TrainingStartError",
    "Trigger",
    "TriggerError",
    "TriggerReport",
    "UnknownModelError",
    "handle_raw_events",
    "run_scheduled_trainings",
    "start_training",
]

logger = Logger(child=True)

# What a training start may spend compacting before it builds a dataset (the raw-events
# Lambda runs up to 600 s); a large backlog is left to the compaction schedule.
TRIGGER_COMPACTION_SECONDS = 240


class TriggerError(Exception):
    """Base class of trigger errors."""


class TrainingInProgressError(TriggerError):
    """A training of this model is already running (HTTP 409)."""

    def __init__(self, model: str, version: int | None, job_name: str = "") -> None:
        self.model, self.version, self.job_name = model, version, job_name
        running = f"v{version} ({job_name})" if version else "another training"
        super().__init__(f"{model}: {running} is still in progress")


class NoDataError(TriggerError):
    """Nothing to train on: no raw data, or no new records without force (HTTP 409)."""


class TrainingStartError(TriggerError):
    """The job did not start; the version is recorded FAILED and the lock released."""

    def __init__(self, model: str, version: int, reason: str) -> None:
        self.model, self.version, self.reason = model, version, reason
        super().__init__(f"{model} v{version}: training did not start: {reason}")


@dataclass(frozen=True)
class TrainingStart:
    model: str
    version: int
    job_name: str
    backend: str
    reason: str
    dataset_key: str
    manifest_key: str
    objects: int
    records: int
    new_records: int
    champion_version: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TriggerReport:
    """What one invocation did (logged; returned for tests and the local stack)."""

    counted: list[dict[str, Any]] = field(default_factory=list)   # {key, model, records}
    duplicates: list[str] = field(default_factory=list)           # event ids seen before
    ignored: list[str] = field(default_factory=list)              # why, one line each
    started: list[TrainingStart] = field(default_factory=list)
    not_started: dict[str, str] = field(default_factory=dict)     # model -> why

    def to_dict(self) -> dict[str, Any]:
        return {
            "counted": self.counted,
            "duplicates": self.duplicates,
            "ignored": self.ignored,
            "started": [s.to_dict() for s in self.started],
            "not_started": self.not_started,
        }


# ------------------------------------------------------------------ event parsing


def iter_s3_records(event: Any) -> Iterator[dict[str, Any]]:
    """S3 event records from an SQS event (body = S3 event, or SNS-wrapped) or a direct S3 event.

    S3's `s3:TestEvent` (sent when a notification is configured), bodies that are not
    JSON (or nest too deeply to parse) and records that are not objects are skipped
    with a log line: a bad message must not fail the whole SQS batch.
    """
    records = event.get("Records") if isinstance(event, Mapping) else None
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, Mapping):
            logger.warning("raw-events: skipping a record that is not an object")
            continue
        if "body" in record:  # SQS
            body = _json_or_none(record["body"])
            if isinstance(body, dict) and body.get("Type") == "Notification" and "Message" in body:
                body = _json_or_none(body["Message"])  # S3 -> SNS -> SQS
            if not isinstance(body, dict):
                logger.warning("raw-events: skipping SQS message %s: not a JSON S3 event",
                            shown(record.get("messageId")))
                continue
            if body.get("Event") == "s3:TestEvent":
                continue
            inner = body.get("Records")
            yield from (r for r in (inner if isinstance(inner, list) else [])
                        if isinstance(r, dict))
        elif record.get("eventSource") == "aws:s3" or "s3" in record:
            yield dict(record)


def _json_or_none(text: Any) -> Any:
    if not isinstance(text, str | bytes):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None



def _field(section: Any, name: str) -> str:
    """A string field of an event section; "" when the section or the field is something else."""
    value = section.get(name) if isinstance(section, Mapping) else None
    return value if isinstance(value, str) else ""


def _valid_key(key: str) -> bool:
    """S3 keys are 1-1,024 bytes of UTF-8 (no lone surrogates), so nothing else is looked up."""
    try:
        return 0 < len(key.encode("utf-8")) <= 1024
    except UnicodeEncodeError:
        return False


def s3_event_id(bucket: str, key: str) -> str:
    """The idempotency id of an object-created event.

    Bucket and (decoded) key only: a raw key names one ingest batch (its id
    derives from the SQS message ids), so S3's redelivery of the event and an
    ingest replay that rewrites the same object must both count once. The
    sequencer would differ for the rewrite; the ETag would too (gzip stamps).
    """
    return f"s3://{bucket}/{key}"


# ------------------------------------------------------------------ the trigger


class Trigger:
    """Starts trainings; every collaborator is injectable (tests, the local stack)."""

    def __init__(self, *, clients: Any, settings: Settings, config: PipelineConfig,
                 registry: Registry | None = None, state: StateStore | None = None,
                 backend_factory: Callable[[str], TrainingBackend] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clients = clients
        self.settings = settings
        self.config = config
        self.registry = registry or Registry.for_settings(settings, clients)
        self.state = state or StateStore.for_settings(settings, clients, clock=clock)
        self.backend_factory = backend_factory or (
            lambda name: backend_for(name, clients, settings))
        self.clock = clock
        self.metrics = PipelineMetrics(settings.stage)

    # -- S3 events

    def handle_raw_events(self, event: Mapping[str, Any]) -> TriggerReport:
        report = TriggerReport()
        totals: dict[str, int] = {}
        for record in iter_s3_records(event):
            self._count_record(record, report, totals)
        for model_name, total in sorted(totals.items()):
            model = self.config.models[model_name]
            if total < model.min_new_records:
                report.not_started[model_name] = (
                    f"{total} new records, {model.min_new_records} start a training")
                continue
            self._try_start(model_name, "new-data", report)
        logger.info("raw-events: %s", json.dumps(report.to_dict(), default=str))
        return report

    def _count_record(self, record: Mapping[str, Any], report: TriggerReport,
                      totals: dict[str, int]) -> None:
        name = _field(record, "eventName")
        s3 = record.get("s3")
        s3 = s3 if isinstance(s3, Mapping) else {}
        bucket = _field(s3.get("bucket"), "name")
        key = unquote_plus(_field(s3.get("object"), "key"))
        if not name.startswith("ObjectCreated"):
            report.ignored.append(f"{shown(name) if name else 'no eventName'}: {shown(key)}")
            return
        if not _valid_key(key):
            report.ignored.append(f"not an S3 object key: {shown(key)}")
            return
        if bucket != self.settings.bucket:
            report.ignored.append(f"bucket {bucket!r} is not the stage's: {key}")
            return
        model = layout.model_of_raw_key(key)
        if not is_raw_data_key(key) or model is None:
            report.ignored.append(f"not a raw data object: {key}")
            return
        if model not in self.config.models:
            report.ignored.append(f"unknown model {model!r}: {key}")
            return
        try:
            records = count_records(self.clients.s3, bucket, key)
        except UnreadableObjectError as exc:
            report.ignored.append(f"unreadable raw object: {exc}")
            return
        except Exception as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchKey", "NotFound"):
                report.ignored.append(f"object is gone: {key}")
                return
            raise  # a transient S3 error: let SQS redeliver the batch (counting is idempotent)
        event_id = s3_event_id(bucket, key)
        total = self.state.count_event_records(event_id, model, records)
        if total is None:
            report.duplicates.append(event_id)
            return
        report.counted.append({"key": key, "model": model, "records": records})
        totals[model] = total

    def _try_start(self, model_name: str, reason: str, report: TriggerReport,
                   *, force: bool = False) -> None:
        try:
            report.started.append(self.start_training(model_name, reason=reason, force=force))
        except (TrainingInProgressError, NoDataError, TrainingStartError) as exc:
            # Not raised: an SQS redelivery would not help, and the next event
            # (or tick) retries with the records still counted.
            report.not_started[model_name] = str(exc)

    # -- schedule

    def run_schedule(self) -> TriggerReport:
        report = TriggerReport()
        now = self.clock()
        for name, model in sorted(self.config.models.items()):
            expression = model.training.schedule
            if not expression:
                continue
            try:
                due = schedule_due(expression, now, self.state.last_training_started_at(name))
            except ScheduleError as exc:
                report.not_started[name] = str(exc)
                continue
            if not due:
                report.not_started[name] = f"{expression} is not due"
            elif self.state.new_records(name) <= 0:
                report.not_started[name] = "no new records since the last training"
            else:
                self._try_start(name, "schedule", report)
        logger.info("schedule: %s", json.dumps(report.to_dict(), default=str))
        return report

    # -- starting one training

    def start_training(self, model_name: str, *, reason: str = "manual",
                       force: bool = False) -> TrainingStart:
        """Start a training of `model_name` now.

        Needs new records since the last training unless `force` (retrain on
        the same data, e.g. after a code change). Raises UnknownModelError,
        TrainingInProgressError, NoDataError or TrainingStartError.
        """
        model = self.config.model(model_name)
        held = self.state.training_lock(model.name)
        now = self.clock()
        if held is not None and not held.is_stale(now):
            raise TrainingInProgressError(model.name, held.version, held.job_name)
        new_records = self.state.new_records(model.name)
        if new_records <= 0 and not force:
            raise NoDataError(f"{model.name}: no new records since the last training "
                              "(force retrains on the same data)")
        if not has_raw_data(self.clients.s3, self.settings.bucket, model.name):
            raise NoDataError(f"{model.name}: no raw data under "
                              f"s3://{self.settings.bucket}/{layout.raw_prefix(model.name)}")

        version = self.registry.allocate_version(model.name)
        job_name = make_job_name(model.name, version)
        if not self.state.acquire_training_lock(
                model.name, version, job_name,
                max_runtime_seconds=model.training.max_runtime_seconds):
            # Another caller won the race; this version number stays unused.
            current = self.state.training_lock(model.name)
            raise TrainingInProgressError(model.name, current.version if current else None,
                                          current.job_name if current else "")
        if held is not None:
            self._fail_stale(held.model, held.version, held.job_name)
        return self._start_locked(model, version, job_name, reason, new_records)

    def _start_locked(self, model: ModelConfig, version: int, job_name: str, reason: str,
                      new_records: int) -> TrainingStart:
        hyperparameters = training_hyperparameters(model, version)
        lineage: dict[str, Any] = {
            "dataset_key": layout.dataset_key(model.name, version),
            "train_manifest_key": layout.sagemaker_manifest_key(model.name, version),
            "code_version": self.settings.code_version,
            "hyperparameters": hyperparameters,
            "backend": model.training.backend,
            "job_name": job_name,
            "trigger": reason,
            "new_records": new_records,
            "training": {
                "instance_type": model.training.instance_type,
                "gpu_count": model.training.gpu_count,
                "max_runtime_seconds": model.training.max_runtime_seconds,
            },
        }
        created = False
        try:
            snapshot = self._snapshot(model, version, lineage)
            if not snapshot.objects:
                raise NoDataError(f"{model.name}: the raw data disappeared before the snapshot")
            champion = self.registry.current_release(model.name)
            champion_key = layout.champion_key(model.name, champion.version) if champion else None
            if champion_key:
                # Fail here with a clear reason rather than minutes later in the job.
                self.clients.s3.head_object(Bucket=self.settings.bucket, Key=champion_key)
            lineage["dataset"] = snapshot.summary()
            lineage["champion_version"] = champion.version if champion else None
            self.registry.create_training(model.name, version, lineage)
            created = True
            backend = self.backend_factory(model.training.backend)
            backend.start(TrainingRequest(
                model=model.name, version=version, job_name=job_name,
                bucket=self.settings.bucket, stage=self.settings.stage,
                training=model.training, hyperparameters=hyperparameters,
                manifest_key=snapshot.manifest_key, champion_key=champion_key,
            ))
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"[:1000]
            self._record_start_failure(model.name, version, lineage, created, why)
            raise TrainingStartError(model.name, version, why) from exc
        remaining = self.state.consume_new_records(model.name, new_records, version=version)
        start = TrainingStart(
            model=model.name, version=version, job_name=job_name,
            backend=model.training.backend, reason=reason,
            dataset_key=snapshot.dataset_key, manifest_key=snapshot.manifest_key,
            objects=len(snapshot.objects), records=snapshot.records, new_records=new_records,
            champion_version=champion.version if champion else None,
        )
        with correlated(model=model.name, version=version, job=job_name):
            logger.info("training started: %s (%d new records stay counted)",
                        json.dumps(start.to_dict()), remaining)
        self.metrics.training_started(model.name, version, model.training.backend)
        return start

    def _snapshot(self, model: ModelConfig, version: int, lineage: dict[str, Any]) -> Any:
        """Every raw object (no dataset table), or the model's dataset built by SQL.

        A dataset model first compacts what arrived since the last compaction run (the
        same idempotent run as the schedule's; skipped while that one holds the lease),
        so a training started by new data also trains on it.
        """
        if model.dataset is None:
            return write_snapshot(self.clients.s3, self.settings.bucket, model.name, version)
        s3, bucket = self.clients.s3, self.settings.bucket
        compaction = compact_model(model.name, s3=s3, state=self.state, bucket=bucket,
                                   now=self.clock(),
                                   deadline=time.time() + TRIGGER_COMPACTION_SECONDS)
        try:
            built = build_dataset(
                model, version, s3=s3, bucket=bucket, database=self.settings.athena_database,
                engine_factory=default_engine_factory(
                    clients=self.clients, bucket=bucket, database=self.settings.athena_database,
                    workgroup=self.settings.athena_workgroup, model=model.name),
                now=self.clock())
        except EmptyWindowError as exc:
            raise NoDataError(str(exc)) from None
        lineage["dataset_build"] = {
            "engine": built.engine, "partitions": len(built.partitions), "cutoff_run": built.cutoff,
            "compacted_now": compaction.records_written,
            "seconds": {k: round(v, 3) for k, v in built.seconds.items()},
        }
        return built.snapshot

    def _record_start_failure(self, model: str, version: int, lineage: dict[str, Any],
                              created: bool, why: str) -> None:
        """FAILED with the reason, then the lock released; each step tried on its own."""
        self.metrics.training_failed(model, version, why)
        try:
            if not created:
                self.registry.create_training(model, version, lineage)
            self.registry.transition(model, version, Status.FAILED, expected=[Status.TRAINING],
                                     reason=f"training did not start: {why}", failure_reason=why)
        except Exception:
            logger.exception("could not record %s v%d as FAILED", model, version)
        try:
            self.state.release_training_lock(model, version)
        except Exception:
            logger.exception("could not release the training lock of %s v%d", model, version)

    def _fail_stale(self, model: str, version: int, job_name: str) -> None:
        """A lock past max runtime + margin was taken over: its version never reported back."""
        why = (f"no completion event for job {job_name} within its max runtime and margin; "
               "its training lock was taken over")
        self.metrics.training_failed(model, version, why)
        # TransitionError: it did finish; UnknownVersionError: it never got a record.
        with contextlib.suppress(TransitionError, UnknownVersionError):
            self.registry.transition(model, version, Status.FAILED, expected=[Status.TRAINING],
                                     reason=why, failure_reason=why)


# ------------------------------------------------------------------ entry points


def handle_raw_events(event: Mapping[str, Any], *, clients: Any, settings: Settings,
                      config: PipelineConfig, **deps: Any) -> TriggerReport:
    """The raw-events queue handler (or a direct S3 event)."""
    return Trigger(clients=clients, settings=settings, config=config, **deps) \
        .handle_raw_events(event)


def run_scheduled_trainings(*, clients: Any, settings: Settings, config: PipelineConfig,
                            **deps: Any) -> TriggerReport:
    """The schedule tick (every schedule.SCHEDULE_TICK_MINUTES)."""
    return Trigger(clients=clients, settings=settings, config=config, **deps).run_schedule()


def start_training(model_name: str, *, clients: Any, settings: Settings, config: PipelineConfig,
                   reason: str = "manual", force: bool = False, **deps: Any) -> TrainingStart:
    """Start a training now (operator CLI / route). See Trigger.start_training."""
    return Trigger(clients=clients, settings=settings, config=config, **deps) \
        .start_training(model_name, reason=reason, force=force)
