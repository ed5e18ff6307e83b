"""Compaction of raw/ into Parquet on moto S3: exactly once, count-checked, crash-safe."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq
import pytest
from chalice.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from chalicelib import layout
from chalicelib.compaction import (
    COMPACTED_SCHEMA,
    Compactor,
    LedgerConflictError,
    UnreadableObjectError,
    compact_model,
    days_to_compact,
    parse_raw_object,
    run_scheduled_compaction,
)
from chalicelib.ingest import SqsMessage, encode_lines, ingest_messages
from chalicelib.runtime import Runtime, set_runtime
from chalicelib.state import StateStore
from tests.cloud.ingest_helpers import VIBRATION, reading

DAY1 = datetime(2026, 1, 1, 12, tzinfo=UTC)
DAY2 = datetime(2026, 1, 2, 9, tzinfo=UTC)
NOW = datetime(2026, 1, 2, 23, tzinfo=UTC).timestamp()


class _NoMetrics:
    def publish(self, result: Any) -> None:
        pass


def line(rid: str, **extra: Any) -> str:
    record = {"id": rid, "thing": "pump-001", "model": VIBRATION, "ts": 1.5, "received_at": 7,
              "features": [0.5, 1, 2, 3, 4, 5, 6, 7.25], **extra}
    return json.dumps(record)


def put_raw(s3: Any, bucket: str, when: datetime, batch: str, lines: list[str],
            model: str = VIBRATION, **metadata: str) -> str:
    key = layout.raw_key(model, when, batch)
    s3.put_object(Bucket=bucket, Key=key, Body=encode_lines(lines),
                  Metadata={"record-count": str(len(lines)), **metadata})
    return key


def parts_rows(s3: Any, bucket: str, model: str = VIBRATION) -> list[dict[str, Any]]:
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=layout.compacted_prefix(model)):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            table = pq.read_table(io.BytesIO(body))
            assert table.schema.equals(COMPACTED_SCHEMA)
            rows.extend(dict(r, dt=item["Key"].split("/")[2]) for r in table.to_pylist())
    return rows


@pytest.fixture
def state(aws, settings) -> StateStore:
    return StateStore(settings.state_table, aws.dynamodb)


@pytest.fixture
def compact(aws, settings, state):
    def run(now: float = NOW, **kwargs: Any):
        return compact_model(VIBRATION, s3=aws.s3, state=state, bucket=settings.bucket,
                             now=now, **kwargs)
    return run


def test_ingested_records_become_parquet_rows_partitioned_by_day(aws, settings, config, compact):
    messages = [SqsMessage(f"m{i}", json.dumps(reading(seq=i)), 1_767_268_800_000)
                for i in range(25)]
    ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=config,
                    metrics=_NoMetrics())
    put_raw(aws.s3, settings.bucket, DAY2, "b2",
            [line("x1", reason="sample", inclusion_p=0.02, label=1), line("x2")])

    report = compact()

    rows = parts_rows(aws.s3, settings.bucket)
    assert len(rows) == 27 == report.records_written
    assert Counter(r["dt"] for r in rows) == {"dt=2026-01-01": 25, "dt=2026-01-02": 2}
    by_id = {r["id"]: r for r in rows}
    assert by_id["pump-001-3"]["features"] == reading(seq=3)["features"]
    assert by_id["pump-001-3"]["reason"] is None and by_id["pump-001-3"]["inclusion_p"] is None
    assert (by_id["x1"]["reason"], by_id["x1"]["inclusion_p"], by_id["x1"]["label"]) == \
        ("sample", 0.02, 1)
    assert all(0 <= r["sample_key"] < 1 for r in rows)
    assert {r["compaction_run"] for r in rows} == {report.run}
    compactor = Compactor(s3=aws.s3, bucket=settings.bucket)
    for day in ("2026-01-01", "2026-01-02"):
        check = compactor.verify_partition(VIBRATION, day)
        assert check.ok and check.uncompacted == [], check


def test_a_second_run_writes_nothing_and_new_objects_get_their_own_part(aws, settings, compact):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line(f"a{i}") for i in range(10)])
    first = compact()
    again = compact(now=NOW + 60)
    assert first.records_written == 10 and again.records_written == 0
    assert all(p.parts_written == [] for p in again.partitions)

    put_raw(aws.s3, settings.bucket, DAY1, "b", [line(f"b{i}") for i in range(4)])
    third = compact(now=NOW + 120)
    assert third.records_written == 4
    ids = [r["id"] for r in parts_rows(aws.s3, settings.bucket)]
    assert sorted(ids) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(4)])
    ledger = Compactor(s3=aws.s3, bucket=settings.bucket).read_ledger(VIBRATION, "2026-01-01")
    assert [p.records for p in ledger.parts] == [10, 4]
    assert ledger.parts[0].run < ledger.parts[1].run


class CrashingS3:
    """The real (moto) client, except that chosen calls fail as if the Lambda died there."""

    def __init__(self, s3: Any, fail: set[str]) -> None:
        self._s3, self.fail = s3, fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def put_object(self, **kwargs: Any) -> Any:
        if "ledger" in self.fail and kwargs["Key"].startswith(layout.COMPACTION_LEDGERS):
            raise RuntimeError("killed before the ledger commit")
        return self._s3.put_object(**kwargs)

    def delete_object(self, **kwargs: Any) -> Any:
        if "delete" in self.fail:
            raise RuntimeError("killed before cleaning up")
        return self._s3.delete_object(**kwargs)


def test_a_run_killed_between_part_and_ledger_leaves_no_duplicate(aws, settings, state):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line(f"a{i}") for i in range(6)])
    crashing = CrashingS3(aws.s3, {"ledger", "delete"})
    with pytest.raises(RuntimeError):
        compact_model(VIBRATION, s3=crashing, state=state, bucket=settings.bucket, now=NOW)
    orphan = aws.s3.list_objects_v2(Bucket=settings.bucket, Prefix=layout.COMPACTED + "/")
    assert orphan["KeyCount"] == 1  # the part is there, the ledger does not list it

    put_raw(aws.s3, settings.bucket, DAY1, "b", [line(f"b{i}") for i in range(3)])
    report = compact_model(VIBRATION, s3=aws.s3, state=state, bucket=settings.bucket,
                           now=NOW + 3600)
    assert report.partitions[0].orphans_deleted == [orphan["Contents"][0]["Key"]]
    ids = Counter(r["id"] for r in parts_rows(aws.s3, settings.bucket))
    assert set(ids.values()) == {1} and len(ids) == 9
    assert Compactor(s3=aws.s3, bucket=settings.bucket).verify_partition(
        VIBRATION, "2026-01-01").ok


def test_a_failed_commit_removes_its_part(aws, settings, state):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line("a")])
    with pytest.raises(RuntimeError):
        compact_model(VIBRATION, s3=CrashingS3(aws.s3, {"ledger"}), state=state,
                      bucket=settings.bucket, now=NOW)
    assert aws.s3.list_objects_v2(Bucket=settings.bucket,
                                  Prefix=layout.COMPACTED + "/")["KeyCount"] == 0
    assert state.acquire_lease(f"compaction#{VIBRATION}", "someone", 60)  # lease released


def test_a_concurrent_ledger_change_commits_nothing(aws, settings):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line("a")])
    compactor = Compactor(s3=aws.s3, bucket=settings.bucket)
    compactor.compact_partition(VIBRATION, "2026-01-01", run=1)
    put_raw(aws.s3, settings.bucket, DAY1, "b", [line("b")])

    class Interloper(CrashingS3):
        def get_object(self, **kwargs: Any) -> Any:
            response = self._s3.get_object(**kwargs)
            if kwargs["Key"].startswith(layout.COMPACTION_LEDGERS):
                # Another writer commits right after this run read the ledger.
                body = response["Body"].read()
                self._s3.put_object(Bucket=kwargs["Bucket"], Key=kwargs["Key"],
                                    Body=body + b"\n")  # new content, a new ETag
                response["Body"] = io.BytesIO(body)
            return response

    with pytest.raises(LedgerConflictError):
        Compactor(s3=Interloper(aws.s3, set()), bucket=settings.bucket).compact_partition(
            VIBRATION, "2026-01-01", run=2)
    assert [r["id"] for r in parts_rows(aws.s3, settings.bucket)] == ["a"]


def test_unreadable_objects_are_recorded_and_do_not_block_the_rest(aws, settings, compact):
    good = put_raw(aws.s3, settings.bucket, DAY1, "good", [line("g1"), line("g2")])
    bad_gzip = layout.raw_key(VIBRATION, DAY1, "notgzip")
    aws.s3.put_object(Bucket=settings.bucket, Key=bad_gzip, Body=b"plain text")
    put_raw(aws.s3, settings.bucket, DAY1, "short", [line("s1")], **{"record-count": "2"})
    put_raw(aws.s3, settings.bucket, DAY1, "badjson", [line("j1"), "{not json"])
    put_raw(aws.s3, settings.bucket, DAY1, "badtype", [line("t1", features="many")])
    put_raw(aws.s3, settings.bucket, DAY1, "noid", [json.dumps({"thing": "t", "ts": 1})])

    report = compact()

    assert [r["id"] for r in parts_rows(aws.s3, settings.bucket)] == ["g1", "g2"]
    reasons = report.partitions[0].unreadable
    assert set(reasons) == {k.split("dt=2026-01-01/")[1] for k in (
        bad_gzip, *(layout.raw_key(VIBRATION, DAY1, b)
                    for b in ("short", "badjson", "badtype", "noid")))}
    assert "not valid gzip" in reasons["hour=12/notgzip.jsonl.gz"]
    assert "metadata says 2" in reasons["hour=12/short.jsonl.gz"]
    assert "line 2 is not JSON" in reasons["hour=12/badjson.jsonl.gz"]
    assert "no 'id'" in reasons["hour=12/noid.jsonl.gz"]
    assert compact(now=NOW + 60).records_written == 0  # recorded, not re-read every run
    check = Compactor(s3=aws.s3, bucket=settings.bucket).verify_partition(VIBRATION, "2026-01-01")
    assert check.ledger_records == 2 and check.uncompacted == [] and len(check.unreadable) == 5
    assert aws.s3.head_object(Bucket=settings.bucket, Key=good)  # raw/ is never touched


def test_a_held_lease_skips_the_model(aws, settings, state, compact):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line("a")])
    assert state.acquire_lease(f"compaction#{VIBRATION}", "other-run", 600)
    report = compact()
    assert report.skipped == {VIBRATION: "another compaction run holds the lease"}
    assert report.records_written == 0


def test_the_time_budget_leaves_the_rest_for_the_next_run(aws, settings, state):
    for i in range(3):
        put_raw(aws.s3, settings.bucket, DAY1, f"b{i}", [line(f"r{i}")])
    compactor = Compactor(s3=aws.s3, bucket=settings.bucket, max_part_source_bytes=1,
                          clock=iter([0, 0, 10, 10]).__next__)
    result = compactor.compact_partition(VIBRATION, "2026-01-01", run=5, deadline=5)
    assert result.sources_compacted == 2 and result.pending == 1
    assert Compactor(s3=aws.s3, bucket=settings.bucket).compact_partition(
        VIBRATION, "2026-01-01", run=6).records_written == 1


def test_days_to_compact_are_recent_days_and_days_never_compacted(aws, settings, compact):
    old = datetime(2025, 6, 1, tzinfo=UTC)
    put_raw(aws.s3, settings.bucket, old, "old", [line("o")])
    put_raw(aws.s3, settings.bucket, DAY2, "new", [line("n")])
    compactor = Compactor(s3=aws.s3, bucket=settings.bucket)
    today = DAY2.date()
    assert days_to_compact(compactor, VIBRATION, today) == ["2025-06-01", "2026-01-02"]
    compact()
    assert days_to_compact(compactor, VIBRATION, today) == ["2026-01-02"]


def test_the_schedule_handler_compacts_every_model(aws, settings):
    from app import app

    put_raw(aws.s3, settings.bucket, DAY1, "a", [line("a")])
    rt = Runtime.from_settings(settings, aws)
    set_runtime(rt)
    try:
        with Client(app) as client:
            client.lambda_.invoke("compact_on_schedule", {
                "version": "0", "id": "1", "detail-type": "Scheduled Event",
                "source": "aws.events", "account": "123456789012",
                "time": "2026-01-01T13:00:00Z", "region": "us-east-1", "resources": [],
                "detail": {}})
    finally:
        set_runtime(None)
    assert [r["id"] for r in parts_rows(aws.s3, settings.bucket)] == ["a"]


def test_run_scheduled_compaction_reports_per_partition(aws, settings, config):
    put_raw(aws.s3, settings.bucket, DAY1, "a", [line("a"), line("b")])
    report = run_scheduled_compaction(clients=aws, settings=settings, config=config, now=NOW)
    assert report.records_written == 2
    assert json.loads(json.dumps(report.to_dict()))["partitions"][0]["day"] == "2026-01-01"


def test_parse_raw_object_counts_lines_and_ignores_unknown_fields():
    body = gzip.compress((line("a", future_field={"x": 1}) + "\n\n" + line("b") + "\n").encode())
    table = parse_raw_object(body, "raw/x.jsonl.gz", {"record-count": "2"})
    assert table.column("id").to_pylist() == ["a", "b"]
    with pytest.raises(UnreadableObjectError, match="metadata says 3"):
        parse_raw_object(body, "raw/x.jsonl.gz", {"record-count": "3"})


# Arrivals: per step, a list of (day index, batch of record ids); a compaction may run
# after any step. Whatever the interleaving, every record ends up exactly once.
_steps = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.integers(0, 10_000), min_size=1, max_size=5,
                                          unique=True), st.booleans()),
    min_size=1, max_size=6)


@hsettings(max_examples=12, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_any_interleaving_of_arrivals_and_runs_compacts_each_record_once(aws, settings, steps):
    state = StateStore(settings.state_table, aws.dynamodb)
    bucket = f"prop-{abs(hash(repr(steps))) % 10**12}"
    aws.s3.create_bucket(Bucket=bucket)
    expected: list[str] = []
    now = NOW
    for n, (day, ids, run_after) in enumerate(steps):
        when = datetime(2026, 1, 1 + day, 5, tzinfo=UTC)
        rids = [f"s{n}-{i}" for i in ids]
        put_raw(aws.s3, bucket, when, f"batch{n}", [line(r) for r in rids])
        expected.extend(rids)
        if run_after:
            now += 60
            compact_model(VIBRATION, s3=aws.s3, state=state, bucket=bucket, now=now,
                          max_part_source_bytes=200)
    compact_model(VIBRATION, s3=aws.s3, state=state, bucket=bucket, now=now + 60)
    assert sorted(r["id"] for r in parts_rows(aws.s3, bucket)) == sorted(expected)


@pytest.fixture
def config():
    from chalicelib.config import load_pipeline_config
    from chalicelib.settings import DEFAULT_PIPELINE_CONFIG

    return load_pipeline_config(DEFAULT_PIPELINE_CONFIG)


@pytest.fixture(autouse=True)
def _no_leftover_runtime() -> Iterator[None]:
    yield
    set_runtime(None)


def test_the_glue_table_has_the_compacted_columns_and_the_partition_layout():
    import pyarrow as pa

    from tests.infra.support import PIPELINE_TEMPLATE, load_template

    hive = {pa.string(): "string", pa.float64(): "double", pa.int64(): "bigint",
            pa.bool_(): "boolean", pa.list_(pa.float64()): "array<double>"}
    table = load_template(PIPELINE_TEMPLATE)["Resources"]["TelemetryTable"]["Properties"]
    columns = table["TableInput"]["StorageDescriptor"]["Columns"]
    assert [(c["Name"], c["Type"]) for c in columns] == \
        [(f.name, hive[f.type]) for f in COMPACTED_SCHEMA]
    assert [k["Name"] for k in table["TableInput"]["PartitionKeys"]] == ["model", "dt"]
    template = table["TableInput"]["Parameters"]["storage.location.template"]["Fn::Sub"]
    # The same layout as chalicelib.layout.compacted_partition_prefix:
    assert template.endswith(
        "/" + layout.compacted_partition_prefix("${!model}", "${!dt}"))
