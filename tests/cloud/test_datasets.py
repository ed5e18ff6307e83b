"""Datasets: allocation, one SQL text on DuckDB (moto S3) and Athena (moto's Athena API)."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlglot
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from chalicelib import layout
from chalicelib.compaction import compact_model
from chalicelib.config import DatasetConfig, ModelConfig, parse_pipeline_config
from chalicelib.datasets import (
    DATASET_COLUMNS,
    AthenaEngine,
    DatasetError,
    DuckDbEngine,
    EmptyWindowError,
    StratumCount,
    Window,
    allocate,
    build_dataset,
    choose_engine,
    counts_sql,
    dataset_sql,
    relation,
    unload_sql,
)
from chalicelib.ingest import encode_lines
from chalicelib.state import StateStore
from tests.cloud.athena_support import moto_athena_client

MODEL = "vib"
NOW = datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp()
DATABASE = "mledge_test_data"
WORKGROUP = "mledge-test-datasets"


def model_config(**dataset: Any) -> ModelConfig:
    table = {"window_days": 30, "max_records": 100, "stratify_by": ["day"], **dataset}
    config = parse_pipeline_config({"models": {MODEL: {
        "family": "kmeans_anomaly", "metric": "silhouette", "threshold": 0.1,
        "thing_group": "g", "schema": {"features": ["a", "b"]}, "dataset": table}}})
    return config.models[MODEL]


def record(rid: str, thing: str = "t1", **extra: Any) -> str:
    return json.dumps({"id": rid, "thing": thing, "model": MODEL, "ts": 1.0,
                       "received_at": 5, "features": [1.0, 2.0], **extra})


def put_day(s3: Any, bucket: str, day: int, lines: list[str], batch: str = "b",
            month: int = 3) -> None:
    when = datetime(2026, month, day, 10, tzinfo=UTC)
    s3.put_object(Bucket=bucket, Key=layout.raw_key(MODEL, when, f"{batch}{day}"),
                  Body=encode_lines(lines), Metadata={"record-count": str(len(lines))})


@pytest.fixture
def compacted(aws, settings):
    def run(now: float = NOW) -> None:
        state = StateStore(settings.state_table, aws.dynamodb)
        compact_model(MODEL, s3=aws.s3, state=state, bucket=settings.bucket, now=now,
                      days=None)
    return run


def duckdb_factory(aws, settings):
    def make(name: str, partitions, workdir: Path):
        assert name == "duckdb"
        return DuckDbEngine(s3=aws.s3, bucket=settings.bucket, database=DATABASE, model=MODEL,
                            partitions=partitions, workdir=workdir)
    return make


def dataset_rows(s3: Any, bucket: str, version: int) -> list[dict[str, Any]]:
    rows = []
    prefix = layout.dataset_data_prefix(MODEL, version)
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        table = pq.read_table(io.BytesIO(body))
        assert tuple(table.column_names) == DATASET_COLUMNS
        rows.extend(table.to_pylist())
    return rows


def build(aws, settings, model: ModelConfig, version: int = 1, now: float = NOW):
    return build_dataset(model, version, s3=aws.s3, bucket=settings.bucket, database=DATABASE,
                         engine_factory=duckdb_factory(aws, settings), now=now)


# ------------------------------------------------------------------ allocation


def test_allocation_gives_small_strata_everything_and_splits_the_rest_by_weight():
    spec = DatasetConfig(max_records=100, stratify_by=("reason",),
                         weights={"reason=flagged": 3.0})
    counts = [StratumCount(("sample",), False, 1000), StratumCount(("flagged",), False, 1000),
              StratumCount(("none",), False, 5), StratumCount(("sample",), True, 20)]
    allocation = allocate(spec, counts)
    assert allocation.labelled == 20
    p = allocation.probabilities
    assert p[("none",)] == 1.0
    # 80 - 5 = 75 left: flagged gets 3/4, sample 1/4
    assert p[("flagged",)] == pytest.approx(75 * 0.75 / 1000)
    assert p[("sample",)] == pytest.approx(75 * 0.25 / 1000)
    assert allocation.expected == pytest.approx(100)


def test_labelled_records_over_the_cap_leave_no_sample_budget():
    spec = DatasetConfig(max_records=10)
    allocation = allocate(spec, [StratumCount(("d",), True, 50), StratumCount(("d",), False, 9)])
    assert allocation.probabilities == {}


@hsettings(max_examples=200, deadline=None)
@given(sizes=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 10**7),
                             max_size=20),
       weights=st.dictionaries(st.text(min_size=1, max_size=5), st.floats(0, 100), max_size=5),
       cap=st.integers(10, 10**7), labelled=st.integers(0, 10**6))
def test_allocation_never_exceeds_the_cap_and_probabilities_are_probabilities(
        sizes, weights, cap, labelled):
    spec = DatasetConfig(max_records=cap, stratify_by=("thing",),
                         weights={f"thing={k}": w for k, w in weights.items()})
    counts = [StratumCount((k,), False, n) for k, n in sizes.items()]
    counts.append(StratumCount(("x",), True, labelled))
    allocation = allocate(spec, counts)
    assert all(0.0 <= p <= 1.0 for p in allocation.probabilities.values())
    assert allocation.expected <= max(cap, labelled) * (1 + 1e-9) + 1e-6
    weighted = [k for k in sizes if sizes[k] and spec.weights.get(f"thing={k}", 1.0) > 0]
    if labelled < cap and sum(sizes[k] for k in weighted) <= cap - labelled:
        assert all(allocation.probabilities[(k,)] == 1.0 for k in weighted)


# ------------------------------------------------------------------ SQL text


def test_the_sql_parses_as_trino_and_as_duckdb():
    spec = model_config(stratify_by=["day", "reason"], weights={"reason=flagged": 2.0}).dataset
    window = Window("2026-01-01", "2026-03-10")
    allocation = allocate(spec, [StratumCount(("2026-01-01", "it's"), False, 10)])
    for sql in (counts_sql(spec, relation(DATABASE), MODEL, window, 42),
                dataset_sql(spec, relation(DATABASE), MODEL, window, 42, allocation)):
        for dialect in ("trino", "duckdb"):
            sqlglot.parse_one(sql, read=dialect)  # raises on a syntax error
        assert "it''s" in sql or "GROUP BY" in sql
    unload = unload_sql("SELECT 1", "s3://b/datasets/vib/v00001/data/")
    sqlglot.parse_one(unload.replace("UNLOAD (", "SELECT * FROM (", 1).split(") TO")[0] + ")",
                      read="trino")


def test_choose_engine_by_window_size():
    spec = DatasetConfig(athena_above_records=1000)
    assert choose_engine(spec, 1000) == "duckdb"
    assert choose_engine(spec, 1001) == "athena"
    assert choose_engine(replace(spec, engine="duckdb"), 10**9) == "duckdb"


# ------------------------------------------------------------------ DuckDB on moto S3


def test_duckdb_builds_a_capped_stratified_sample_with_every_labelled_record(
        aws, settings, compacted):
    for day in (1, 2, 3):
        put_day(aws.s3, settings.bucket, day, [record(f"d{day}-{i}") for i in range(200)])
    put_day(aws.s3, settings.bucket, 4, [record(f"l{i}", label=1) for i in range(30)], "lab")
    put_day(aws.s3, settings.bucket, 20, [record("old")], month=1)  # outside the window
    compacted()

    built = build(aws, settings, model_config(max_records=150))

    rows = dataset_rows(aws.s3, settings.bucket, 1)
    assert len(rows) <= 150 and len(rows) == built.snapshot.records
    assert {r["id"] for r in rows if r["label"] == 1} == {f"l{i}" for i in range(30)}
    per_day = Counter(r["dt"] for r in rows if r["label"] is None)
    assert set(per_day) == {"2026-03-01", "2026-03-02", "2026-03-03"}
    assert all(25 <= n <= 55 for n in per_day.values()), per_day  # ~40 each (120 / 3)
    assert {r["sample_p"] for r in rows if r["label"] == 1} == {1.0}
    assert all(r["sample_p"] == pytest.approx(40 / 200) for r in rows if r["label"] is None)
    assert "old" not in {r["id"] for r in rows}
    assert built.engine == "duckdb"
    manifest = json.loads(aws.s3.get_object(
        Bucket=settings.bucket, Key=layout.dataset_key(MODEL, 1))["Body"].read())
    assert [p["day"] for p in manifest["partitions"]] == [
        "2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
    assert manifest["dataset_sql"] == built.sql and manifest["engine"] == "duckdb"
    train = json.loads(aws.s3.get_object(
        Bucket=settings.bucket, Key=layout.sagemaker_manifest_key(MODEL, 1))["Body"].read())
    assert train[1:] == [o["key"] for o in manifest["objects"]]


def test_a_record_stored_twice_appears_once(aws, settings, compacted):
    put_day(aws.s3, settings.bucket, 1, [record("dup"), record("a")], "x")
    put_day(aws.s3, settings.bucket, 1, [record("dup")], "y")  # SQS redelivery in a new batch
    compacted()
    build(aws, settings, model_config(max_records=1000))
    ids = [r["id"] for r in dataset_rows(aws.s3, settings.bucket, 1)]
    assert sorted(ids) == ["a", "dup"]


def test_weights_shift_the_sample_towards_a_stratum(aws, settings, compacted):
    lines = [record(f"s{i}", reason="sample", inclusion_p=0.1) for i in range(300)]
    lines += [record(f"f{i}", reason="flagged", inclusion_p=1.0) for i in range(300)]
    put_day(aws.s3, settings.bucket, 5, lines)
    compacted()
    build(aws, settings, model_config(max_records=100, stratify_by=["reason"],
                                      weights={"reason=flagged": 3.0}))
    rows = dataset_rows(aws.s3, settings.bucket, 1)
    reasons = Counter(r["reason"] for r in rows)
    assert reasons["flagged"] > 2 * reasons["sample"], reasons
    assert {r["inclusion_p"] for r in rows if r["reason"] == "sample"} == {0.1}


def test_the_stored_sql_rebuilds_the_same_rows_after_more_data_arrives(
        aws, settings, compacted, tmp_path):
    put_day(aws.s3, settings.bucket, 9, [record(f"a{i}") for i in range(300)])
    compacted()
    first = build(aws, settings, model_config(max_records=50))
    put_day(aws.s3, settings.bucket, 9, [record(f"b{i}") for i in range(300)], "later")
    compacted(now=NOW + 600)

    # Rebuild from what the manifest recorded, over the partitions as they are now.
    from chalicelib.compaction import Compactor
    from chalicelib.datasets import select_partitions

    now_partitions = select_partitions(Compactor(s3=aws.s3, bucket=settings.bucket), MODEL,
                                       Window("2026-02-09", "2026-03-10"))
    assert now_partitions[0].records == 600
    engine = DuckDbEngine(s3=aws.s3, bucket=settings.bucket, database=DATABASE, model=MODEL,
                          partitions=now_partitions, workdir=tmp_path)
    again = engine.query(first.sql)
    original = [(r["id"], r["sample_key"]) for r in dataset_rows(aws.s3, settings.bucket, 1)]
    assert [(r[0], r[8]) for r in again] == original


def test_an_empty_window_is_a_clear_error(aws, settings, compacted):
    put_day(aws.s3, settings.bucket, 1, [record("x")], month=1)
    compacted()
    with pytest.raises(EmptyWindowError, match="no compacted records between 2026-02-09"):
        build(aws, settings, model_config())


# ------------------------------------------------------------------ Athena (moto's API)


@pytest.fixture
def athena(aws):
    client = moto_athena_client()
    client.create_work_group(Name=WORKGROUP, Configuration={
        "ResultConfiguration": {"OutputLocation": "s3://mledge-test-data/athena-results/"}})
    return client


def test_athena_runs_the_same_sql_text_with_unload_into_datasets(
        aws, settings, compacted, athena):
    from moto.athena.models import QueryResults, athena_backends

    put_day(aws.s3, settings.bucket, 3, [record(f"a{i}") for i in range(20)])
    compacted()
    # moto runs no SQL: give the counts query its answer (Athena returns strings,
    # header row first), and let UNLOAD's output be what DuckDB would have written.
    athena_backends["123456789012"]["us-east-1"].query_results_queue.append(QueryResults(
        rows=[{"Data": [{"VarCharValue": v} for v in ("s0", "labelled", "records")]},
              {"Data": [{"VarCharValue": v} for v in ("2026-03-03", "0", "20")]}],
        column_info=[]))
    engine = AthenaEngine(athena=athena, bucket=settings.bucket, database=DATABASE,
                          workgroup=WORKGROUP, sleep=lambda s: None)
    model = model_config(engine="athena", max_records=10)

    def factory(name: str, partitions, workdir: Path):
        assert name == "athena"
        duck = DuckDbEngine(s3=aws.s3, bucket=settings.bucket, database=DATABASE,
                            model=MODEL, partitions=partitions, workdir=workdir)

        class AthenaThenOutput:
            name = "athena"

            def query(self, sql: str):
                assert engine.query(sql) == [("2026-03-03", "0", "20")]
                return duck.query(sql)

            def unload(self, sql: str, prefix: str) -> None:
                engine.unload(sql, prefix)
                duck.unload(sql, prefix)  # the rows Athena would have written

        return AthenaThenOutput()

    built = build_dataset(model, 1, s3=aws.s3, bucket=settings.bucket, database=DATABASE,
                          engine_factory=factory, now=NOW)

    executions = [athena.get_query_execution(QueryExecutionId=e)["QueryExecution"]
                  for e in engine.executions]
    assert [e["Status"]["State"] for e in executions] == ["SUCCEEDED", "SUCCEEDED"]
    assert executions[0]["Query"] == built.counts_sql
    assert executions[1]["Query"] == unload_sql(
        built.sql, f"s3://{settings.bucket}/{layout.dataset_data_prefix(MODEL, 1)}")
    assert all(e["QueryExecutionContext"]["Database"] == DATABASE for e in executions)
    assert all(e["WorkGroup"] == WORKGROUP for e in executions)
    assert 0 < len(dataset_rows(aws.s3, settings.bucket, 1)) <= 10


class ScriptedAthena:
    """A fake Athena whose queries end as scripted (moto's always succeed at once)."""

    def __init__(self, states: list[dict[str, str]]) -> None:
        self.states, self.stopped = states, []

    def start_query_execution(self, **kwargs: Any) -> dict[str, str]:
        return {"QueryExecutionId": "q1"}

    def get_query_execution(self, QueryExecutionId: str) -> dict[str, Any]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"QueryExecution": {"Status": state}}

    def stop_query_execution(self, QueryExecutionId: str) -> None:
        self.stopped.append(QueryExecutionId)


def test_athena_failures_and_timeouts_are_dataset_errors():
    failing = ScriptedAthena([{"State": "RUNNING"}, {"State": "FAILED",
                                                     "StateChangeReason": "COLUMN_NOT_FOUND"}])
    engine = AthenaEngine(athena=failing, bucket="b", database=DATABASE, workgroup=WORKGROUP,
                          sleep=lambda s: None)
    with pytest.raises(DatasetError, match="q1 FAILED: COLUMN_NOT_FOUND"):
        engine.run("SELECT 1")
    slow = ScriptedAthena([{"State": "RUNNING"}])
    ticks = iter(range(0, 10_000, 100))
    engine = AthenaEngine(athena=slow, bucket="b", database=DATABASE, workgroup=WORKGROUP,
                          timeout_seconds=250, sleep=lambda s: None, clock=lambda: next(ticks))
    with pytest.raises(DatasetError, match="still RUNNING after 250s; stopped"):
        engine.run("SELECT 1")
    assert slow.stopped == ["q1"]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(("table", "message"), [
    ({"stratify_by": ["weekday"]}, "unknown stratum 'weekday'"),
    ({"stratify_by": ["day"], "weights": {"reason=flagged": 2}}, "column of stratify_by"),
    ({"weights": {"day": 2}}, "column of stratify_by"),
    ({"engine": "spark"}, "must be one of auto, duckdb, athena"),
    ({"max_records": 0}, "at least 10"),
    ({"window_days": 0}, "at least 1"),
    ({"sample": 1}, "not a known field"),
])
def test_bad_dataset_tables_name_the_field(table, message):
    from chalicelib.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        model_config(**table)


def test_models_without_a_dataset_table_keep_the_raw_snapshot():
    from chalicelib.config import load_pipeline_config
    from chalicelib.settings import DEFAULT_PIPELINE_CONFIG

    config = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)
    assert config.models["digits"].dataset is None


# ------------------------------------------------------------------ the trigger


def test_a_dataset_model_trains_on_its_dataset_compacted_first(aws, settings):
    import tomllib

    from chalicelib.registry import Registry
    from chalicelib.trigger import Trigger
    from tests.cloud.trigger_helpers import TEST_PIPELINE, RecordingBackend, put_raw, readings

    config = parse_pipeline_config(tomllib.loads(
        TEST_PIPELINE + "\n[models.vib.dataset]\nwindow_days = 7\nmax_records = 40\n"))
    put_raw(aws.s3, settings.bucket, "vib", "s1", readings("vib", 100))
    state = StateStore(settings.state_table, aws.dynamodb)
    state.add_new_records("vib", 100)
    backend = RecordingBackend()
    trigger = Trigger(clients=aws, settings=settings, config=config,
                      backend_factory=lambda name: backend,
                      clock=lambda: datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp())

    start = trigger.start_training("vib")

    (request,) = backend.requests
    train = json.loads(aws.s3.get_object(Bucket=settings.bucket,
                                         Key=request.manifest_key)["Body"].read())
    assert train[1:] == [layout.dataset_data_prefix("vib", 1) + "part-00000.parquet"]
    assert 0 < start.records <= 40 and start.objects == 1
    lineage = Registry(settings.registry_table, aws.dynamodb).get("vib", 1).lineage
    assert lineage["dataset_build"]["engine"] == "duckdb"
    assert lineage["dataset_build"]["compacted_now"] == 100
    assert lineage["dataset"]["records"] == start.records


def test_a_dataset_model_without_data_in_its_window_does_not_start(aws, settings):
    import tomllib

    from chalicelib.trigger import NoDataError, TrainingStartError, Trigger
    from tests.cloud.trigger_helpers import TEST_PIPELINE, RecordingBackend, put_raw, readings

    config = parse_pipeline_config(tomllib.loads(
        TEST_PIPELINE + "\n[models.vib.dataset]\nwindow_days = 7\n"))
    put_raw(aws.s3, settings.bucket, "vib", "s1", readings("vib", 10))
    StateStore(settings.state_table, aws.dynamodb).add_new_records("vib", 10)
    trigger = Trigger(clients=aws, settings=settings, config=config,
                      backend_factory=lambda name: RecordingBackend(),
                      clock=lambda: datetime(2024, 9, 1, tzinfo=UTC).timestamp())
    with pytest.raises(TrainingStartError, match="no compacted records between 2024-08-26") \
            as caught:
        trigger.start_training("vib")
    assert isinstance(caught.value.__cause__, NoDataError)  # recorded FAILED, lock released
    assert StateStore(settings.state_table, aws.dynamodb).training_lock("vib") is None


def test_two_stratum_columns_run_on_duckdb(aws, settings, compacted):
    lines = [record(f"s{i}", reason="sample", inclusion_p=0.5) for i in range(100)]
    lines += [record(f"f{i}", reason="flagged", inclusion_p=1.0) for i in range(100)]
    put_day(aws.s3, settings.bucket, 6, lines)
    put_day(aws.s3, settings.bucket, 7, lines[:100], "again")  # the same ids a day later
    compacted()
    build(aws, settings, model_config(max_records=60, stratify_by=["day", "reason"],
                                      weights={"reason=sample": 0.0}))
    rows = dataset_rows(aws.s3, settings.bucket, 1)
    assert rows and {r["reason"] for r in rows} == {"flagged"}
    assert len({r["id"] for r in rows}) == len(rows) <= 60


def test_too_many_strata_is_a_clear_error():
    from chalicelib.datasets import MAX_STRATA

    spec = model_config(stratify_by=["thing"], max_records=10**6).dataset
    counts = [StratumCount((f"t{i}",), False, 10**4) for i in range(MAX_STRATA + 1)]
    with pytest.raises(DatasetError, match="stratify by fewer columns"):
        dataset_sql(spec, relation(DATABASE), MODEL, Window("2026-01-01", "2026-01-02"), 1,
                    allocate(spec, counts))
