"""Compaction: raw/ gzip JSON lines -> Parquet partitioned by model and UTC day.

raw/ stays the source of truth (its lifecycle rule decides how long it is kept);
compaction only ever adds a derived copy that engines built for columnar data
(DuckDB, Athena) can scan:

- `compacted/<model>/dt=YYYY-MM-DD/part-<run>-<digest>.parquet`: the records of a
  group of raw objects of that day (the day of the raw key, i.e. of arrival), one
  row per raw line, columns `COMPACTED_SCHEMA`. A part is written once and never
  changed: dataset snapshots refer to it.
- `compacted-ledgers/<model>/dt=YYYY-MM-DD.json`: the partition's ledger, the parts in
  commit order, each with the raw objects (relative key, record count) it holds,
  plus raw objects that could not be read and why. The ledger is the commit point:
  a part that no ledger lists is an orphan of a crashed run and is deleted by the
  next run, before it adds anything.

Exactly once: a raw object is compacted only if no ledger part lists it, and a part
enters the ledger in one conditional PUT (If-Match on the ledger's ETag, or
If-None-Match for a new ledger). Runs of one model are kept apart by a lease in the
state table, so orphan clean-up never races a writer. Count check: every raw object's
rows must equal its `record-count` metadata and its non-empty lines, and the Parquet
footer of each part must hold the sum of its sources' rows, before the part is
committed; `verify_partition` re-counts both sides from S3.

Columns added here: `sample_key` (a uniform number in [0, 1) from SHA-256 of the
record id; the dataset sample uses it, so every engine picks the same records),
`source` (the raw object, relative to the day) and `compaction_run` (the run that
committed the part: epoch milliseconds, increasing; snapshots pin a cutoff on it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from aws_lambda_powertools import Logger

from chalicelib import layout
from chalicelib.aws import error_code
from chalicelib.config import PipelineConfig
from chalicelib.settings import Settings
from chalicelib.snapshot import RECORD_COUNT_METADATA, is_raw_data_key
from chalicelib.state import StateStore

logger = Logger(child=True)

COMPACTION_TICK_MINUTES = 60
"""How often the schedule handler compacts (app.py uses this constant)."""
LOOKBACK_DAYS = 2
"""Days before today that every run re-checks for raw objects not yet compacted."""
MAX_PART_SOURCE_BYTES = 32 * 1024 * 1024
"""Gzip bytes of raw objects per part: bounds a run's memory (~5x this in Arrow)."""
RUN_BUDGET_SECONDS = 12 * 60
"""A scheduled run stops starting new parts after this (Lambda's limit is 15 minutes)."""
LEASE_MARGIN_SECONDS = 5 * 60
PARQUET_COMPRESSION = "zstd"
JSON_BLOCK_BYTES = 4 * 1024 * 1024
"""Arrow's JSON reader block: ≥ the longest line (128 KiB, IoT Core's limit); measured fastest."""
ROW_GROUP_ROWS = 128 * 1024

# The fields of a raw/ line (chalicelib.records.normalise_reading) that compaction
# keeps. `reason` / `inclusion_p` say why a device sent the reading and how likely it
# was to be sent; records from agents that predate them get nulls.
RAW_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("thing", pa.string()),
    pa.field("ts", pa.float64()),
    pa.field("received_at", pa.int64()),
    pa.field("features", pa.list_(pa.float64())),
    pa.field("label", pa.int64()),
    pa.field("model_version", pa.int64()),
    pa.field("score", pa.float64()),
    pa.field("anomaly", pa.bool_()),
    pa.field("reason", pa.string()),
    pa.field("inclusion_p", pa.float64()),
])
COMPACTED_SCHEMA = RAW_SCHEMA.append(pa.field("sample_key", pa.float64())) \
    .append(pa.field("source", pa.string())) \
    .append(pa.field("compaction_run", pa.int64()))
"""Columns of every compacted part; `model` and `dt` are partition keys (the path)."""
_REQUIRED = ("id", "thing", "ts", "received_at", "features")


class CompactionError(Exception):
    """Compaction could not proceed (S3 refused a write, a ledger is unreadable...)."""


class LedgerConflictError(CompactionError):
    """The ledger changed under this run (another writer): nothing was committed."""


class UnreadableObjectError(CompactionError):
    """A raw object that cannot be turned into rows; `str()` is the recorded reason."""


@dataclass(frozen=True)
class LedgerPart:
    key: str
    run: int
    records: int
    bytes: int
    sources: tuple[tuple[str, int], ...]
    """(raw key relative to the day's prefix, records)."""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "run": self.run, "records": self.records, "bytes": self.bytes,
                "sources": [list(s) for s in self.sources]}


@dataclass
class Ledger:
    model: str
    day: str
    parts: list[LedgerPart] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    """Relative raw key -> why it could not be compacted (it stays in raw/)."""
    etag: str | None = None

    @property
    def records(self) -> int:
        return sum(p.records for p in self.parts)

    @property
    def last_run(self) -> int:
        return max((p.run for p in self.parts), default=0)

    def compacted_sources(self) -> set[str]:
        return {s for p in self.parts for s, _ in p.sources}

    def to_json(self) -> bytes:
        return json.dumps({
            "model": self.model, "day": self.day, "records": self.records,
            "parts": [p.to_dict() for p in self.parts], "unreadable": self.unreadable,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, etag: str | None) -> Ledger:
        doc = json.loads(data)
        parts = [LedgerPart(key=p["key"], run=int(p["run"]), records=int(p["records"]),
                            bytes=int(p["bytes"]),
                            sources=tuple((str(s), int(n)) for s, n in p["sources"]))
                 for p in doc["parts"]]
        return cls(model=doc["model"], day=doc["day"], parts=parts,
                   unreadable=dict(doc.get("unreadable", {})), etag=etag)


@dataclass
class PartitionResult:
    model: str
    day: str
    parts_written: list[str] = field(default_factory=list)
    records_written: int = 0
    sources_compacted: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    orphans_deleted: list[str] = field(default_factory=list)
    pending: int = 0
    """Raw objects left for the next run (the time budget ran out)."""
    total_records: int = 0
    """Records the partition's ledger holds after this run."""


@dataclass
class CompactionReport:
    run: int
    partitions: list[PartitionResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """model -> why it was not compacted (lease held by another run)."""

    @property
    def records_written(self) -> int:
        return sum(p.records_written for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "records_written": self.records_written,
                "partitions": [asdict(p) for p in self.partitions], "skipped": self.skipped}


# ------------------------------------------------------------------ parsing


def sample_keys(ids: Iterable[str]) -> pa.Array:
    """Uniform [0, 1) per id: bytes 8..15 of SHA-256(utf-8 id) / 2**64.

    Bytes 0..7 decide the trainer's holdout (trainer.data.holdout_bucket); using the
    next eight keeps the dataset sample independent of the holdout split.
    """
    sha256 = hashlib.sha256
    scale = 1.0 / 2**64
    return pa.array([int.from_bytes(sha256(i.encode("utf-8")).digest()[8:16], "big") * scale
                     for i in ids], type=pa.float64())


def decode_raw_object(body: bytes, key: str, metadata: dict[str, str] | None = None
                      ) -> tuple[bytes, int]:
    """The object's JSON lines (gunzipped, blank lines dropped) and their count, checked
    against its `record-count` metadata; UnreadableObjectError if it cannot be."""
    if key.endswith(".gz"):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise UnreadableObjectError(f"not valid gzip: {exc}") from None
    if body and body.endswith(b"\n") and b"\n\n" not in body and not body.startswith(b"\n") \
            and b"\r" not in body:
        lines = body.count(b"\n")  # what ingest writes: the fast path
    else:
        kept = [line for line in body.splitlines() if line.strip()]
        lines = len(kept)
        body = b"".join(line + b"\n" for line in kept)
    claimed = (metadata or {}).get(RECORD_COUNT_METADATA)
    if claimed is not None and claimed.strip().isdigit() and int(claimed) != lines:
        raise UnreadableObjectError(f"{RECORD_COUNT_METADATA} metadata says {int(claimed)} "
                                    f"records, the object holds {lines} lines")
    return body, lines


def parse_lines(data: bytes, lines: int) -> pa.Table:
    """`lines` JSON lines as `RAW_SCHEMA` rows; UnreadableObjectError naming the problem."""
    if lines == 0:
        return RAW_SCHEMA.empty_table()
    try:
        rows = pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES),
            parse_options=pa_json.ParseOptions(explicit_schema=RAW_SCHEMA,
                                               unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        rows = _parse_line_by_line(data)
    if rows.num_rows != lines:
        raise UnreadableObjectError(f"{lines} lines gave {rows.num_rows} rows")
    for name in _REQUIRED:
        if rows.column(name).null_count:
            raise UnreadableObjectError(f"{rows.column(name).null_count} records have no "
                                        f"{name!r}")
    return rows.select(RAW_SCHEMA.names).cast(RAW_SCHEMA)


def parse_raw_object(body: bytes, key: str, metadata: dict[str, str] | None = None) -> pa.Table:
    """The rows of one raw object as `RAW_SCHEMA`, count-checked; UnreadableObjectError if not."""
    return parse_lines(*decode_raw_object(body, key, metadata))


def _parse_line_by_line(body: bytes) -> pa.Table:
    """The slow path, only to name the first bad line of an object Arrow refused."""
    rows = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnreadableObjectError(f"line {number} is not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise UnreadableObjectError(f"line {number} is not a JSON object")
        rows.append(row)
    try:
        return pa.table({f.name: pa.array([row.get(f.name) for row in rows], type=f.type)
                         for f in RAW_SCHEMA}, schema=RAW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise UnreadableObjectError(f"a record does not fit the raw schema: {exc}") from None


def to_compacted(rows: pa.Table, sources: Sequence[tuple[str, int]], run: int) -> pa.Table:
    """Add sample_key, source and compaction_run to rows of `sources` (in that order)."""
    source = pa.concat_arrays([pa.repeat(pa.scalar(name, pa.string()), count)
                               for name, count in sources]) if sources \
        else pa.array([], pa.string())
    return pa.table(
        [*rows.columns, sample_keys(rows.column("id").to_pylist()), source,
         pa.repeat(pa.scalar(run, pa.int64()), rows.num_rows)],
        schema=COMPACTED_SCHEMA)


def parquet_bytes(rows: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(rows, sink, compression=PARQUET_COMPRESSION,
                   row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue()


# ------------------------------------------------------------------ the compactor


class Compactor:
    """Compacts one model's day partitions; every collaborator is injectable."""

    def __init__(self, *, s3: Any, bucket: str, max_part_source_bytes: int = MAX_PART_SOURCE_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.max_part_source_bytes = max_part_source_bytes
        self.clock = clock

    # -- ledgers

    def read_ledger(self, model: str, day: str) -> Ledger:
        key = layout.compaction_ledger_key(model, day)
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return Ledger(model=model, day=day)
            raise
        try:
            return Ledger.from_json(response["Body"].read(), response.get("ETag"))
        except (ValueError, KeyError, TypeError) as exc:
            # Never guess: a ledger we cannot read would make us compact records twice.
            raise CompactionError(f"s3://{self.bucket}/{key}: unreadable ledger: {exc}") from None

    def _commit(self, ledger: Ledger) -> None:
        key = layout.compaction_ledger_key(ledger.model, ledger.day)
        condition = {"IfMatch": ledger.etag} if ledger.etag else {"IfNoneMatch": "*"}
        try:
            response = self.s3.put_object(Bucket=self.bucket, Key=key, Body=ledger.to_json(),
                                          ContentType="application/json", **condition)
        except Exception as exc:
            if error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise LedgerConflictError(f"{key} changed during the run") from exc
            raise
        ledger.etag = response.get("ETag")

    # -- listing

    def raw_days(self, model: str) -> list[str]:
        """Every UTC day that has a raw/ prefix for the model (one entry per day)."""
        return self._day_prefixes(layout.raw_prefix(model), "dt=", "/")

    def ledger_days(self, model: str) -> set[str]:
        return set(self._day_prefixes(f"{layout.COMPACTION_LEDGERS}/{model}/", "dt=", ".json",
                                      delimited=False))

    def _day_prefixes(self, prefix: str, head: str, tail: str, *,
                      delimited: bool = True) -> list[str]:
        days = []
        paginator = self.s3.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimited:
            kwargs["Delimiter"] = "/"
        for page in paginator.paginate(**kwargs):
            names = ([p["Prefix"] for p in page.get("CommonPrefixes", [])] if delimited
                     else [o["Key"] for o in page.get("Contents", [])])
            for name in names:
                leaf = name[len(prefix):]
                if leaf.startswith(head) and leaf.endswith(tail):
                    day = leaf[len(head):len(leaf) - len(tail)]
                    if _is_day(day):
                        days.append(day)
        return sorted(days)

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(page.get("Contents", []))
        out.sort(key=lambda o: o["Key"])
        return out

    # -- one partition

    def compact_partition(self, model: str, day: str, *, run: int,
                          deadline: float | None = None) -> PartitionResult:
        result = PartitionResult(model=model, day=day)
        ledger = self.read_ledger(model, day)
        run = max(run, ledger.last_run + 1)  # parts of a partition commit in run order
        committed = {p.key for p in ledger.parts}
        for orphan in self._list(layout.compacted_partition_prefix(model, day)):
            if orphan["Key"] not in committed:
                self.s3.delete_object(Bucket=self.bucket, Key=orphan["Key"])
                result.orphans_deleted.append(orphan["Key"])
        day_prefix = layout.raw_day_prefix(model, day)
        done = ledger.compacted_sources() | set(ledger.unreadable)
        pending = [o for o in self._list(day_prefix)
                   if is_raw_data_key(o["Key"]) and o["Key"][len(day_prefix):] not in done]
        groups = _groups(pending, self.max_part_source_bytes)
        for index, group in enumerate(groups):
            if deadline is not None and self.clock() >= deadline:
                result.pending = sum(len(g) for g in groups[index:])
                break
            self._compact_group(ledger, group, day_prefix, run, result)
        result.total_records = ledger.records
        return result

    def _compact_group(self, ledger: Ledger, group: Sequence[dict[str, Any]], day_prefix: str,
                       run: int, result: PartitionResult) -> None:
        decoded: list[tuple[str, bytes, int]] = []
        for entry in group:
            rel = entry["Key"][len(day_prefix):]
            response = self.s3.get_object(Bucket=self.bucket, Key=entry["Key"])
            try:
                decoded.append((rel, *decode_raw_object(response["Body"].read(), entry["Key"],
                                                        response.get("Metadata"))))
            except UnreadableObjectError as exc:
                self._unreadable(ledger, result, entry["Key"], rel, exc)
        # One parse for the whole group (Arrow's reader is fast on large inputs); only
        # if that fails is each object parsed alone, to set aside the bad ones.
        tables: list[pa.Table] = []
        sources: list[tuple[str, int]] = []
        try:
            tables = [parse_lines(b"".join(d for _, d, _ in decoded),
                                  sum(n for _, _, n in decoded))]
            sources = [(rel, n) for rel, _, n in decoded]
        except UnreadableObjectError:
            for rel, data, n in decoded:
                try:
                    tables.append(parse_lines(data, n))
                    sources.append((rel, n))
                except UnreadableObjectError as exc:
                    self._unreadable(ledger, result, day_prefix + rel, rel, exc)
        if not sources:
            if result.unreadable:
                self._commit(ledger)  # remember them, so no run re-reads them every tick
            return
        data = to_compacted(pa.concat_tables(tables), sources, run)
        body = parquet_bytes(data)
        expected = sum(n for _, n in sources)
        footer_rows = pq.read_metadata(io.BytesIO(body)).num_rows
        if footer_rows != expected:  # pragma: no cover - Arrow would have to drop rows
            raise CompactionError(f"count check: {expected} rows in, {footer_rows} in the part")
        digest = hashlib.sha256("\n".join(s for s, _ in sources).encode()).hexdigest()[:16]
        key = layout.compacted_part_key(ledger.model, ledger.day, run, digest)
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                           ContentType="application/vnd.apache.parquet",
                           Metadata={RECORD_COUNT_METADATA: str(expected),
                                     "compaction-run": str(run)})
        part = LedgerPart(key=key, run=run, records=expected, bytes=len(body),
                          sources=tuple(sources))
        ledger.parts.append(part)
        try:
            self._commit(ledger)
        except Exception:
            ledger.parts.pop()
            self.s3.delete_object(Bucket=self.bucket, Key=key)  # never committed: an orphan
            raise
        result.parts_written.append(key)
        result.records_written += expected
        result.sources_compacted += len(sources)

    def _unreadable(self, ledger: Ledger, result: PartitionResult, key: str, rel: str,
                    exc: Exception) -> None:
        logger.error("compaction: s3://%s/%s stays uncompacted: %s", self.bucket, key, exc)
        ledger.unreadable[rel] = str(exc)[:500]
        result.unreadable[rel] = str(exc)[:500]

    # -- verification

    def verify_partition(self, model: str, day: str) -> CountCheck:
        """Re-count one partition from S3: raw metadata vs ledger vs Parquet footers."""
        ledger = self.read_ledger(model, day)
        day_prefix = layout.raw_day_prefix(model, day)
        raw: dict[str, int] = {}
        for entry in self._list(day_prefix):
            if is_raw_data_key(entry["Key"]):
                head = self.s3.head_object(Bucket=self.bucket, Key=entry["Key"])
                raw[entry["Key"][len(day_prefix):]] = int(
                    head.get("Metadata", {}).get(RECORD_COUNT_METADATA, -1))
        parquet_rows = 0
        for part in ledger.parts:
            body = self.s3.get_object(Bucket=self.bucket, Key=part.key)["Body"].read()
            parquet_rows += pq.read_metadata(io.BytesIO(body)).num_rows
        listed = [s for p in ledger.parts for s, _ in p.sources]
        return CountCheck(
            model=model, day=day,
            raw_records=sum(n for n in raw.values() if n >= 0),
            raw_objects=len(raw),
            ledger_records=ledger.records,
            parquet_records=parquet_rows,
            compacted_sources=len(listed),
            duplicated_sources=len(listed) - len(set(listed)),
            uncompacted=sorted(set(raw) - set(listed) - set(ledger.unreadable)),
            unreadable=dict(ledger.unreadable),
            uncompacted_records=sum(raw[s] for s in set(raw) - set(listed) if raw[s] >= 0),
        )


@dataclass(frozen=True)
class CountCheck:
    model: str
    day: str
    raw_records: int
    raw_objects: int
    ledger_records: int
    parquet_records: int
    compacted_sources: int
    duplicated_sources: int
    uncompacted: list[str]
    unreadable: dict[str, str]
    uncompacted_records: int

    @property
    def ok(self) -> bool:
        """Every raw record is in exactly one part, or waits / is recorded unreadable."""
        return (self.parquet_records == self.ledger_records
                and self.duplicated_sources == 0
                and self.ledger_records + self.uncompacted_records == self.raw_records)


def _groups(entries: Sequence[dict[str, Any]], max_bytes: int) -> list[list[dict[str, Any]]]:
    groups: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        if current and size + int(entry.get("Size", 0)) > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += int(entry.get("Size", 0))
    if current:
        groups.append(current)
    return groups


def _is_day(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


# ------------------------------------------------------------------ entry points


def days_to_compact(compactor: Compactor, model: str, today: date,
                    lookback_days: int = LOOKBACK_DAYS) -> list[str]:
    """Raw days never compacted, plus today and the `lookback_days` before it.

    Cheap at any history length: one delimited listing of raw/ days and one listing of
    the ledgers (one entry per day each), never a listing of every raw object.
    """
    raw = compactor.raw_days(model)
    since = (today - timedelta(days=lookback_days)).isoformat()  # ISO days sort as dates
    missing = set(raw) - compactor.ledger_days(model)
    return sorted(d for d in raw if d >= since or d in missing)


def compact_model(model: str, *, s3: Any, state: StateStore, bucket: str,
                  now: float | None = None, days: Sequence[str] | None = None,
                  deadline: float | None = None, report: CompactionReport | None = None,
                  max_part_source_bytes: int = MAX_PART_SOURCE_BYTES,
                  clock: Callable[[], float] = time.time) -> CompactionReport:
    """Compact the model's pending raw objects under its lease (skipped if another run holds it).

    `now` names the run and decides which days are recent; `deadline` is on `clock`'s
    scale (no new part starts after it).
    """
    now = clock() if now is None else now
    report = report or CompactionReport(run=int(now * 1000))
    compactor = Compactor(s3=s3, bucket=bucket, max_part_source_bytes=max_part_source_bytes,
                          clock=clock)
    lease = f"compaction#{model}"
    holder = f"run-{report.run}"
    budget = (deadline - clock()) if deadline is not None else RUN_BUDGET_SECONDS
    if not state.acquire_lease(lease, holder, max(budget, 0) + LEASE_MARGIN_SECONDS):
        report.skipped[model] = "another compaction run holds the lease"
        return report
    try:
        today = datetime.fromtimestamp(now, UTC).date()
        for day in days if days is not None else days_to_compact(compactor, model, today):
            report.partitions.append(
                compactor.compact_partition(model, day, run=report.run, deadline=deadline))
    finally:
        state.release_lease(lease, holder)
    return report


def run_scheduled_compaction(*, clients: Any, settings: Settings, config: PipelineConfig,
                             now: float | None = None,
                             budget_seconds: float = RUN_BUDGET_SECONDS) -> CompactionReport:
    """The schedule handler: compact every configured model within one time budget."""
    now = time.time() if now is None else now
    state = StateStore.for_settings(settings, clients)
    report = CompactionReport(run=int(now * 1000))
    deadline = time.time() + budget_seconds
    for model in sorted(config.models):
        compact_model(model, s3=clients.s3, state=state, bucket=settings.bucket, now=now,
                      deadline=deadline, report=report)
    logger.info("compaction: %s", json.dumps(report.to_dict(), default=str)[:20000])
    return report
