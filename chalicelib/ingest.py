"""Telemetry ingestion: one SQS batch in, at most one S3 object per model and kind out.

Every message of a batch is classified by `chalicelib.records.classify_message` as a
reading, a summary or a rejection, and the batch is written as gzip JSON lines:

- readings    -> `raw/<model>/dt=YYYY-MM-DD/hour=HH/<batch-id>.jsonl.gz`
- summaries   -> `summaries/<model>/dt=.../hour=.../<batch-id>.jsonl.gz`
- rejections  -> `quarantine/<model or _unknown>/dt=.../hour=.../<batch-id>.jsonl.gz`

each with S3 metadata `record-count`. Count in == raw + summaries + quarantine.

Replay safety without an idempotency table: the batch id is a hash of the batch's
messages (SQS message ids, plus each body so that synthetic events that reuse one id
stay distinct), the lines are sorted by message, gzip carries no timestamp, and each
PUT is conditional (`If-None-Match: *`). A redelivered batch therefore maps to the
same keys with byte-identical content, finds them present, and writes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from chalicelib import layout
from chalicelib.aws import AwsClients
from chalicelib.config import PipelineConfig
from chalicelib.observability import PipelineMetrics
from chalicelib.records import (
    MAX_ARRIVAL_MS,
    MAX_RECEIVED_AT_SKEW_MS,
    Reading,
    Rejection,
    Summary,
    classify_message,
)
from chalicelib.settings import Settings
from chalicelib.untrusted import safe_repr

INGEST_BATCH_SIZE = 1000
"""Messages per Lambda invocation (SQS allows up to 10,000 with a batching window)."""
INGEST_BATCHING_WINDOW_SECONDS = 20
"""How long Lambda gathers messages before invoking: fewer, larger objects."""
GZIP_LEVEL = 6
RAW_KIND, SUMMARY_KIND, QUARANTINE_KIND = "raw", "summaries", "quarantine"
_KEY_FOR_KIND = {
    RAW_KIND: layout.raw_key,
    SUMMARY_KIND: layout.summaries_key,
    QUARANTINE_KIND: layout.quarantine_key,
}
MAX_LOGGED_REASONS = 20
MAX_FALLBACK_MS = MAX_ARRIVAL_MS - MAX_RECEIVED_AT_SKEW_MS
"""The latest SentTimestamp taken as a record's arrival: any `received_at` it allows still
names a partition date."""

logger = Logger(child=True)


class IngestError(Exception):
    """The batch could not be stored; Lambda retries it (its writes are replay-safe)."""


@dataclass(frozen=True, slots=True)
class SqsMessage:
    message_id: str
    body: Any
    sent_timestamp_ms: int | None = None


@dataclass
class StoredObject:
    kind: str
    model: str
    key: str
    record_count: int
    size: int
    written: bool
    """False when the key was already present (a replayed batch)."""


@dataclass
class IngestResult:
    batch_id: str
    received: int
    accepted: dict[str, int] = field(default_factory=dict)
    summaries: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    objects: list[StoredObject] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    """The first MAX_LOGGED_REASONS rejection reasons, for the log line."""
    device_readings: dict[str, int] = field(default_factory=dict)
    device_anomalies: dict[str, int] = field(default_factory=dict)
    """Per model: readings and anomalies that this batch's device summaries report."""

    @property
    def stored(self) -> int:
        return sum(self.accepted.values()) + sum(self.summaries.values()) + sum(
            self.quarantined.values())

    @property
    def puts(self) -> int:
        return len(self.objects)


class IngestMetrics(Protocol):
    def publish(self, result: IngestResult) -> None: ...


class EmfIngestMetrics:
    """The batch's counts as Powertools EMF metrics (chalicelib/observability.py), per model:
    records accepted / quarantined, summaries stored, and the anomaly rate the device
    summaries report."""

    def __init__(self, stage: str) -> None:
        self.metrics = PipelineMetrics(stage)

    def publish(self, result: IngestResult) -> None:
        # Count only objects this invocation wrote, so a replayed batch adds nothing.
        counts: dict[str, dict[str, int]] = {}
        for stored in result.objects:
            if stored.written:
                per_kind = counts.setdefault(stored.model, dict.fromkeys(_KEY_FOR_KIND, 0))
                per_kind[stored.kind] += stored.record_count
        for model, per_kind in sorted(counts.items()):
            summaries_written = per_kind[SUMMARY_KIND] > 0
            self.metrics.ingest(
                model, accepted=per_kind[RAW_KIND], quarantined=per_kind[QUARANTINE_KIND],
                summaries=per_kind[SUMMARY_KIND],
                readings=result.device_readings.get(model, 0) if summaries_written else 0,
                anomalies=result.device_anomalies.get(model, 0) if summaries_written else 0)


def summary_counts(line: str) -> tuple[int, int] | None:
    """(readings, anomalies) of an agent summary, or None when it does not carry both
    as sane counts (summaries are kept as devices send them; only sane ones count)."""
    try:
        summary = json.loads(line)
    except ValueError:
        return None
    readings, anomalies = summary.get("readings"), summary.get("anomalies")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (readings, anomalies)):
        return None
    if not 0 <= anomalies <= readings or readings > 10**9:
        return None
    return readings, anomalies


def messages_from_event(event: Any) -> list[SqsMessage]:
    """The messages of a Lambda SQS event (AWS's shape: `Records[].messageId/body/attributes`).

    One message per record, whatever the record holds, so that count in == count stored:
    a record that is not an object becomes a message with that value as its body (which
    classification quarantines), a message id that is not a string is replaced by its
    repr, and a SentTimestamp that is not epoch milliseconds in the partitionable
    range is ignored (the batch's clock is used). An event without a `Records` list
    has no messages.
    """
    records = event.get("Records") if isinstance(event, Mapping) else None
    if not isinstance(records, list):
        return []
    messages = []
    for record in records:
        if not isinstance(record, Mapping):
            messages.append(SqsMessage(message_id="", body=record))
            continue
        message_id = record.get("messageId", "")
        attributes = record.get("attributes")
        sent = attributes.get("SentTimestamp") if isinstance(attributes, Mapping) else None
        messages.append(SqsMessage(
            message_id=message_id if isinstance(message_id, str) else _text(message_id),
            body=record.get("body"),
            sent_timestamp_ms=_epoch_ms(sent),
        ))
    return messages


def _epoch_ms(value: Any) -> int | None:
    """SQS's SentTimestamp (a string of ASCII digits) as an arrival a partition can name."""
    text = str(value) if type(value) in (str, int) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 15):
        return None
    ms = int(text)
    return ms if ms <= MAX_FALLBACK_MS else None


def batch_id_for(messages: Iterable[SqsMessage]) -> str:
    """A stable id for a set of messages, independent of their order in the event."""
    return _batch_id(sorted(messages, key=_message_order))


def _message_order(message: SqsMessage) -> tuple[str, str]:
    return message.message_id, _text(message.body)


def _batch_id(ordered: Sequence[SqsMessage]) -> str:
    digest = hashlib.sha256()
    for message in ordered:
        digest.update(message.message_id.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
        digest.update(_text(message.body).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def ingest_sqs_event(event: Mapping[str, Any], *, clients: AwsClients, settings: Settings,
                     config: PipelineConfig, metrics: IngestMetrics | None = None,
                     now_ms: int | None = None) -> IngestResult:
    """The telemetry handler: store one Lambda SQS event (see module docstring)."""
    return ingest_messages(messages_from_event(event), s3=clients.s3, bucket=settings.bucket,
                           config=config, metrics=metrics or EmfIngestMetrics(settings.stage),
                           now_ms=now_ms)


def ingest_messages(messages: Sequence[SqsMessage], *, s3: Any, bucket: str,
                    config: PipelineConfig, metrics: IngestMetrics | None = None,
                    now_ms: int | None = None) -> IngestResult:
    """Classify and store a batch; raises IngestError if S3 refuses a write."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ordered = sorted(messages, key=_message_order)
    result = IngestResult(batch_id=_batch_id(ordered), received=len(ordered))
    # (kind, model) -> lines in message order, and the earliest arrival (the partition)
    groups: dict[tuple[str, str], list[str]] = {}
    first_arrival: dict[tuple[str, str], int] = {}
    for message in ordered:
        fallback = message.sent_timestamp_ms
        if fallback is None or not 0 <= fallback <= MAX_FALLBACK_MS:
            fallback = now_ms
        outcome = classify_message(message.body, message.message_id, fallback, config,
                                   now_ms=now_ms)
        if type(outcome) is Reading:
            kind, counts = RAW_KIND, result.accepted
        elif type(outcome) is Summary:
            kind, counts = SUMMARY_KIND, result.summaries
            reported = summary_counts(outcome.line)
            if reported is not None:
                readings = result.device_readings
                readings[outcome.model] = readings.get(outcome.model, 0) + reported[0]
                anomalies = result.device_anomalies
                anomalies[outcome.model] = anomalies.get(outcome.model, 0) + reported[1]
        else:
            assert isinstance(outcome, Rejection)
            kind, counts = QUARANTINE_KIND, result.quarantined
            if len(result.reasons) < MAX_LOGGED_REASONS:
                result.reasons.append(f"{message.message_id}: {outcome.reason}")
        group = (kind, outcome.model)
        lines = groups.get(group)
        if lines is None:
            groups[group] = lines = []
            first_arrival[group] = outcome.arrival_ms
        elif outcome.arrival_ms < first_arrival[group]:
            first_arrival[group] = outcome.arrival_ms
        lines.append(outcome.line)
        counts[outcome.model] = counts.get(outcome.model, 0) + 1

    for (kind, model), lines in sorted(groups.items()):
        when = datetime.fromtimestamp(first_arrival[(kind, model)] / 1000, tz=UTC)
        key = _KEY_FOR_KIND[kind](model, when, result.batch_id)
        result.objects.append(_put_once(s3, bucket, kind, model, key, lines, result.batch_id))

    logger.info("ingested telemetry batch", extra={
        "batch_id": result.batch_id, "received": result.received,
        "accepted": result.accepted, "summaries": result.summaries,
        "quarantined": result.quarantined,
        "objects": [{"key": o.key, "records": o.record_count, "written": o.written}
                    for o in result.objects],
        "quarantine_reasons": result.reasons,
    })
    if metrics is not None:
        metrics.publish(result)
    return result


def encode_lines(lines: Sequence[str]) -> bytes:
    """gzip JSON lines; mtime=0 so the same lines always give the same bytes."""
    text = "\n".join(lines) + "\n"
    return gzip.compress(text.encode("utf-8"), compresslevel=GZIP_LEVEL, mtime=0)


def _put_once(s3: Any, bucket: str, kind: str, model: str, key: str, lines: Sequence[str],
              batch_id: str) -> StoredObject:
    body = encode_lines(lines)
    try:
        s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/gzip",
            Metadata={"record-count": str(len(lines)), "batch-id": batch_id},
            IfNoneMatch="*",
        )
        written = True
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") != "PreconditionFailed":
            raise IngestError(f"s3://{bucket}/{key}: {kind} write failed: "
                              f"{error.get('Code')}: {error.get('Message')}") from exc
        written = False  # the same batch stored it before: identical content, nothing to do
    return StoredObject(kind=kind, model=model, key=key, record_count=len(lines),
                        size=len(body), written=written)


def _text(body: Any) -> str:
    return body if isinstance(body, str) else safe_repr(body)
