"""Datasets: what a version trains on, built by one SQL text over the compacted Parquet.

A model with a `[models.<name>.dataset]` table (chalicelib.config.DatasetConfig) trains
on a dataset built here instead of on every raw object:

1. **Partitions.** The compacted partitions (`compacted/<model>/dt=<day>/`) of the last
   `window_days` days, read from their ledgers (one listing plus one GET per day with
   data, never a listing of every object). The snapshot pins each partition's parts
   and a `cutoff`: the newest compaction run it includes. Every row carries its
   `compaction_run`, so `compaction_run <= cutoff` excludes what was compacted later.
2. **Counts.** `counts_sql`: records per stratum (and labelled or not) in the window.
3. **Allocation.** Labelled records are always in (`include_labelled`); the rest of the
   `max_records` budget is split over the strata in proportion to their weights, a
   stratum smaller than its share gives the rest back (water-filling), and each
   stratum's share becomes an inclusion probability `p`.
4. **Dataset.** `dataset_sql`: rows whose `sample_key` (uniform per record id, fixed at
   compaction) is below their stratum's `p`, plus the labelled ones; one copy per
   record id; at most `max_records`, labelled first. Each row says `sample_p`, the
   probability the sample included it, so the trainer can weigh it back.

Both queries are one text for both engines: DuckDB in-process (the default, for local
runs, tests and small fleets) over the snapshot's Parquet parts, downloaded from S3,
behind a view with the Glue table's name; Amazon Athena for large windows, with
`UNLOAD ... TO 's3://<bucket>/datasets/<model>/v<NNNNN>/data/'`. The engine is chosen
by the window's record count (`athena_above_records`) unless the config names one.

`datasets/<model>/v<NNNNN>/manifest.json` keeps the partitions, cutoff, allocation,
engine and both SQL texts: running the stored `dataset_sql` over the same parts gives
the same rows (sample keys are stored, not computed by an engine).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq
from aws_lambda_powertools import Logger

from chalicelib import layout
from chalicelib.compaction import Compactor
from chalicelib.config import DatasetConfig, ModelConfig
from chalicelib.snapshot import DatasetSnapshot, RawObject, label_entries

logger = Logger(child=True)

TABLE = "telemetry"
"""The Glue table over `compacted/` (infra/pipeline.yaml); partition keys `model`, `dt`."""
DATASET_COLUMNS = ("id", "thing", "ts", "received_at", "features", "label", "reason",
                   "inclusion_p", "sample_key", "sample_p", "dt")
"""Columns of a built dataset, in order (the trainer reads them: trainer.columnar)."""
STRATUM_SQL = {
    "day": "r.dt",
    "thing": "r.thing",
    "reason": "COALESCE(r.reason, 'none')",
    "label": "COALESCE(CAST(r.label AS VARCHAR), 'none')",
}
"""How each `stratify_by` name is computed (the same text in DuckDB and Athena)."""
MAX_STRATA = 4000
"""Sampled strata one query may name (each is a CASE branch; Athena takes 256 KB of SQL)."""
ATHENA_POLL_SECONDS = 2.0
ATHENA_TIMEOUT_SECONDS = 600.0


class DatasetError(Exception):
    """The dataset could not be built; the message says why."""


class EmptyWindowError(DatasetError):
    """No compacted records in the window (nothing to train on)."""


@dataclass(frozen=True)
class Partition:
    day: str
    parts: tuple[str, ...]
    records: int
    last_run: int

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, "parts": list(self.parts), "records": self.records,
                "last_run": self.last_run}


@dataclass(frozen=True)
class Window:
    start: str
    end: str

    @classmethod
    def ending(cls, now: float, days: int) -> Window:
        today = datetime.fromtimestamp(now, UTC).date()
        return cls((today - timedelta(days=days - 1)).isoformat(), today.isoformat())


@dataclass(frozen=True)
class StratumCount:
    values: tuple[str, ...]
    labelled: bool
    records: int


@dataclass(frozen=True)
class Allocation:
    labelled: int
    probabilities: dict[tuple[str, ...], float]
    expected: float

    def to_dict(self) -> dict[str, Any]:
        return {"labelled": self.labelled, "expected_records": round(self.expected, 1),
                "strata": [{"values": list(k), "p": p}
                           for k, p in sorted(self.probabilities.items())]}


# ------------------------------------------------------------------ partitions


def select_partitions(compactor: Compactor, model: str, window: Window) -> list[Partition]:
    """The window's compacted partitions as their ledgers list them now."""
    out = []
    for day in sorted(compactor.ledger_days(model)):
        if window.start <= day <= window.end:
            ledger = compactor.read_ledger(model, day)
            if ledger.parts:
                out.append(Partition(day=day, parts=tuple(p.key for p in ledger.parts),
                                     records=ledger.records, last_run=ledger.last_run))
    return out


# ------------------------------------------------------------------ SQL


def relation(database: str) -> str:
    return f'"{database}"."{TABLE}"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _double(value: float) -> str:
    """A DOUBLE literal both engines read the same way (Trino reads 0.25 as DECIMAL)."""
    text = f"{value:.17g}"
    return text.upper() if "e" in text else text + "E0"


def _strata(spec: DatasetConfig) -> list[str]:
    return [STRATUM_SQL[s] for s in spec.stratify_by] or ["'all'"]


def _where(model: str, window: Window, cutoff: int) -> str:
    # Every value is validated before it gets here (model names, ISO days, integers).
    return (f"r.model = {_literal(model)} AND r.dt BETWEEN {_literal(window.start)} "
            f"AND {_literal(window.end)} AND r.compaction_run <= {int(cutoff)}")


def counts_sql(spec: DatasetConfig, source: str, model: str, window: Window, cutoff: int) -> str:
    strata = _strata(spec)
    columns = ", ".join(f"{e} AS s{i}" for i, e in enumerate(strata))
    groups = ", ".join(str(i + 1) for i in range(len(strata) + 1))
    return (f"SELECT {columns}, CASE WHEN r.label IS NULL THEN 0 ELSE 1 END AS labelled, "
            f"COUNT(*) AS records\nFROM {source} r\nWHERE {_where(model, window, cutoff)}\n"
            f"GROUP BY {groups}")


def parse_counts(rows: Iterable[Sequence[Any]], n_strata: int) -> list[StratumCount]:
    return [StratumCount(values=tuple("" if v is None else str(v) for v in row[:n_strata]),
                         labelled=int(row[n_strata]) == 1, records=int(row[n_strata + 1]))
            for row in rows]


def allocate(spec: DatasetConfig, counts: Sequence[StratumCount]) -> Allocation:
    """Labelled records first, then the budget over strata by weight (water-filling)."""
    labelled = sum(c.records for c in counts if c.labelled) if spec.include_labelled else 0
    sizes: dict[tuple[str, ...], int] = {}
    for c in counts:
        if not (c.labelled and spec.include_labelled):
            sizes[c.values] = sizes.get(c.values, 0) + c.records
    weights = {k: _weight(spec, k) for k in sizes}
    budget = float(max(spec.max_records - labelled, 0))
    probabilities: dict[tuple[str, ...], float] = {}
    open_strata = {k for k, n in sizes.items() if n > 0 and weights[k] > 0}
    while open_strata and budget > 0:
        total_weight = sum(weights[k] for k in open_strata)
        full = {k for k in open_strata if budget * weights[k] / total_weight >= sizes[k]}
        if not full:
            for k in open_strata:
                probabilities[k] = min(1.0, budget * weights[k] / total_weight / sizes[k])
            break
        for k in full:  # smaller than its share: all of it, the rest goes to the others
            probabilities[k] = 1.0
            budget -= sizes[k]
        open_strata -= full
    expected = labelled + sum(sizes[k] * p for k, p in probabilities.items())
    return Allocation(labelled=labelled, probabilities=probabilities, expected=expected)


def _weight(spec: DatasetConfig, values: tuple[str, ...]) -> float:
    weight = 1.0
    for name, value in zip(spec.stratify_by, values, strict=False):
        weight *= spec.weights.get(f"{name}={value}", 1.0)
    return weight


def dataset_sql(spec: DatasetConfig, source: str, model: str, window: Window, cutoff: int,
                allocation: Allocation) -> str:
    """The dataset query. Each stratum's probability is a CASE over the stratum key, a
    filter the engine evaluates while it scans (measured 2x faster in DuckDB than joining
    a VALUES table, which made every row carry its features through the join)."""
    if len(allocation.probabilities) > MAX_STRATA:
        raise DatasetError(f"{len(allocation.probabilities)} strata to sample (at most "
                           f"{MAX_STRATA}, so the query fits Athena's 256 KB): stratify by "
                           "fewer columns")
    strata = _strata(spec)
    key = strata[0] if len(strata) == 1 else " || chr(31) || ".join(strata)
    whens = " ".join(f"WHEN {_literal(chr(31).join(k))} THEN {_double(p)}"
                     for k, p in sorted(allocation.probabilities.items()))
    probability = f"CASE {key} {whens} ELSE 0E0 END" if whens else "0E0"
    labelled = spec.include_labelled
    keep = (f"(r.label IS NOT NULL OR r.sample_key < {probability})" if labelled
            else f"r.sample_key < {probability}")
    sample_p = (f"CASE WHEN r.label IS NOT NULL THEN 1E0 ELSE {probability} END" if labelled
                else probability)
    order = ("CASE WHEN label IS NULL THEN 1 ELSE 0 END, sample_key, id" if labelled
             else "sample_key, id")
    return f"""WITH picked AS (
  SELECT r.id, r.thing, r.ts, r.received_at, r.features, r.label, r.reason, r.inclusion_p,
         r.sample_key, {sample_p} AS sample_p, r.dt, r.source
  FROM {source} r
  WHERE {_where(model, window, cutoff)}
    AND {keep}
),
ranked AS (
  SELECT p.*,
         row_number() OVER (PARTITION BY p.id ORDER BY p.received_at, p.dt, p.source) AS copy
  FROM picked p
)
SELECT {', '.join(DATASET_COLUMNS)}
FROM ranked
WHERE copy = 1
ORDER BY {order}
LIMIT {int(spec.max_records)}"""


# ------------------------------------------------------------------ engines


class Engine(Protocol):
    name: str

    def query(self, sql: str) -> list[tuple[Any, ...]]: ...

    def unload(self, sql: str, prefix: str) -> None:
        """Write the query's rows as Parquet under `datasets/.../data/` (an S3 key prefix)."""
        ...


class DuckDbEngine:
    """DuckDB in-process over local copies of the snapshot's parts.

    The parts sit under `workdir` at their S3 keys, so `dt=` in the path is the
    partition column, as in Athena; a view named like the Glue table makes the same
    SQL text run unchanged.
    """

    name = "duckdb"

    def __init__(self, *, s3: Any, bucket: str, database: str, model: str,
                 partitions: Sequence[Partition], workdir: Path,
                 local_root: Path | None = None, threads: int | None = None,
                 memory_limit: str | None = None) -> None:
        import duckdb  # imported here: only models built in-process need it

        self.s3, self.bucket, self.workdir = s3, bucket, workdir
        root = local_root or workdir / "parts"
        files = []
        for partition in partitions:
            for key in partition.parts:
                path = root / key
                if local_root is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, key, str(path))
                files.append(str(path))
        if not files:
            raise EmptyWindowError("no compacted parts in the window")
        self.con = duckdb.connect(config={"threads": threads} if threads else {})
        if memory_limit:
            self.con.execute(f"SET memory_limit = {_literal(memory_limit)}")
        self.con.execute(f'CREATE SCHEMA "{database}"')
        listing = ", ".join(_literal(f) for f in files)
        self.con.execute(
            f"CREATE VIEW {relation(database)} AS SELECT *, {_literal(model)} AS model "
            f"FROM read_parquet([{listing}], hive_partitioning = true, "
            "hive_types = {'dt': VARCHAR})")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.con.execute(sql).fetchall()

    def unload(self, sql: str, prefix: str) -> None:
        out = self.workdir / "dataset.parquet"
        self.con.execute(f"COPY ({sql}) TO {_literal(str(out))} "
                         "(FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE 65536)")
        self.s3.upload_file(str(out), self.bucket, f"{prefix}part-00000.parquet")

    def close(self) -> None:
        self.con.close()


class AthenaEngine:
    """Amazon Athena (Trino) over the Glue table; results in the workgroup's location."""

    name = "athena"

    def __init__(self, *, athena: Any, bucket: str, database: str, workgroup: str,
                 poll_seconds: float = ATHENA_POLL_SECONDS,
                 timeout_seconds: float = ATHENA_TIMEOUT_SECONDS,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.athena, self.bucket = athena, bucket
        self.database, self.workgroup = database, workgroup
        self.poll_seconds, self.timeout_seconds = poll_seconds, timeout_seconds
        self.sleep, self.clock = sleep, clock
        self.executions: list[str] = []

    def run(self, sql: str) -> str:
        """Start one query and wait for it; its execution id, or DatasetError."""
        started = self.athena.start_query_execution(
            QueryString=sql, WorkGroup=self.workgroup,
            QueryExecutionContext={"Database": self.database})
        execution_id = started["QueryExecutionId"]
        self.executions.append(execution_id)
        give_up = self.clock() + self.timeout_seconds
        while True:
            status = self.athena.get_query_execution(
                QueryExecutionId=execution_id)["QueryExecution"]["Status"]
            state = status["State"]
            if state == "SUCCEEDED":
                return execution_id
            if state in ("FAILED", "CANCELLED"):
                raise DatasetError(f"Athena query {execution_id} {state}: "
                                   f"{status.get('StateChangeReason', 'no reason given')}")
            if self.clock() >= give_up:
                self.athena.stop_query_execution(QueryExecutionId=execution_id)
                raise DatasetError(f"Athena query {execution_id} still {state} after "
                                   f"{self.timeout_seconds:.0f}s; stopped")
            self.sleep(self.poll_seconds)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        execution_id = self.run(sql)
        rows: list[tuple[Any, ...]] = []
        paginator = self.athena.get_paginator("get_query_results")
        for page in paginator.paginate(QueryExecutionId=execution_id):
            rows.extend(tuple(c.get("VarCharValue") for c in r["Data"])
                        for r in page["ResultSet"]["Rows"])
        return rows[1:]  # the first row of a SELECT's results holds the column names

    def unload(self, sql: str, prefix: str) -> None:
        self.run(unload_sql(sql, f"s3://{self.bucket}/{prefix}"))


def unload_sql(sql: str, uri: str) -> str:
    return f"UNLOAD (\n{sql}\n) TO {_literal(uri)} WITH (format = 'PARQUET', compression = 'ZSTD')"


def choose_engine(spec: DatasetConfig, window_records: int) -> str:
    if spec.engine != "auto":
        return spec.engine
    return "athena" if window_records > spec.athena_above_records else "duckdb"


# ------------------------------------------------------------------ building


@dataclass
class BuiltDataset:
    snapshot: DatasetSnapshot
    engine: str
    partitions: list[Partition]
    cutoff: int
    allocation: Allocation
    sql: str
    counts_sql: str
    seconds: dict[str, float] = field(default_factory=dict)


def build_dataset(model: ModelConfig, version: int, *, s3: Any, bucket: str, database: str,
                  engine_factory: Callable[[str, list[Partition], Path], Engine],
                  now: float | None = None, workdir: Path | None = None) -> BuiltDataset:
    """Select partitions, count, allocate, run the dataset SQL, write the snapshot manifests."""
    spec = model.dataset
    if spec is None:
        raise DatasetError(f"{model.name}: no [models.{model.name}.dataset] table")
    now = time.time() if now is None else now
    seconds: dict[str, float] = {}
    mark = time.perf_counter()
    window = Window.ending(now, spec.window_days)
    partitions = select_partitions(Compactor(s3=s3, bucket=bucket), model.name, window)
    if not partitions:
        raise EmptyWindowError(f"{model.name}: no compacted records between {window.start} "
                               f"and {window.end} (has compaction run?)")
    cutoff = max(p.last_run for p in partitions)
    name = choose_engine(spec, sum(p.records for p in partitions))
    source = relation(database)
    counting = counts_sql(spec, source, model.name, window, cutoff)
    with tempfile.TemporaryDirectory(prefix="mledge-dataset-", dir=workdir) as tmp:
        engine = engine_factory(name, partitions, Path(tmp))
        seconds["prepare"] = time.perf_counter() - mark
        counts = parse_counts(engine.query(counting), len(_strata(spec)))
        allocation = allocate(spec, counts)
        sql = dataset_sql(spec, source, model.name, window, cutoff, allocation)
        seconds["count"] = time.perf_counter() - mark - seconds["prepare"]
        prefix = layout.dataset_data_prefix(model.name, version)
        engine.unload(sql, prefix)
        seconds["build"] = time.perf_counter() - mark - seconds["prepare"] - seconds["count"]
        close = getattr(engine, "close", None)
        if close:
            close()
    objects = [RawObject(key=o["Key"], size=int(o["Size"]), etag=o["ETag"].strip('"'),
                         records=parquet_rows(s3, bucket, o["Key"], int(o["Size"])))
               for o in _list(s3, bucket, prefix) if not o["Key"].endswith("/")]
    snapshot = DatasetSnapshot(
        model=model.name, version=version, bucket=bucket,
        dataset_key=layout.dataset_key(model.name, version),
        manifest_key=layout.sagemaker_manifest_key(model.name, version),
        objects=tuple(objects),
        created_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    )
    document = {
        "model": model.name, "version": version, "bucket": bucket,
        "created_at": snapshot.created_at, "train_manifest": snapshot.manifest_key,
        "kind": "dataset", "engine": name,
        "window": {"start": window.start, "end": window.end}, "cutoff_run": cutoff,
        "partitions": [p.to_dict() for p in partitions],
        "window_records": sum(p.records for p in partitions),
        "allocation": allocation.to_dict(),
        "counts_sql": counting, "dataset_sql": sql,
        "objects": [o.to_dict() for o in objects], "total": snapshot.summary(),
    }
    # Verdicts travel in the train channel beside the Parquet files, as they do beside a
    # raw snapshot's records (trainer.columnar reads them).
    labels = label_entries(s3, bucket, model.name)
    document["labels"] = labels
    train_manifest: list[Any] = [{"prefix": f"s3://{bucket}/"}, *(o.key for o in objects),
                                 *(label["key"] for label in labels)]
    s3.put_object(Bucket=bucket, Key=snapshot.manifest_key,
                  Body=json.dumps(train_manifest).encode(), ContentType="application/json")
    s3.put_object(Bucket=bucket, Key=snapshot.dataset_key,
                  Body=json.dumps(document, indent=1).encode(), ContentType="application/json")
    logger.info("dataset %s v%d: %s records from %d partitions by %s in %s", model.name, version,
             snapshot.records, len(partitions), name, seconds)
    return BuiltDataset(snapshot=snapshot, engine=name, partitions=partitions, cutoff=cutoff,
                        allocation=allocation, sql=sql, counts_sql=counting, seconds=seconds)


def _list(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(page.get("Contents", []))
    return sorted(out, key=lambda o: o["Key"])


class _S3RangeFile:
    """Just enough of a file for pyarrow to read a Parquet footer with ranged GETs."""

    def __init__(self, s3: Any, bucket: str, key: str, size: int) -> None:
        self.s3, self.bucket, self.key, self.size, self.pos = s3, bucket, key, size, 0
        self.closed = False

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        body = self.s3.get_object(Bucket=self.bucket, Key=self.key,
                                  Range=f"bytes={self.pos}-{end - 1}")["Body"].read()
        self.pos += len(body)
        return body

    def close(self) -> None:
        self.closed = True


def parquet_rows(s3: Any, bucket: str, key: str, size: int) -> int:
    """Rows of a Parquet object from its footer (two small ranged GETs, not the object)."""
    try:
        return pq.read_metadata(_S3RangeFile(s3, bucket, key, size)).num_rows
    except Exception as exc:
        raise DatasetError(f"s3://{bucket}/{key}: not a readable Parquet file: {exc}") from None


def default_engine_factory(*, clients: Any, bucket: str, database: str, workgroup: str,
                           model: str) -> Callable[[str, list[Partition], Path], Engine]:
    """Engines on real clients: DuckDB downloads the parts, Athena queries the Glue table."""

    def make(name: str, partitions: list[Partition], workdir: Path) -> Engine:
        if name == "athena":
            return AthenaEngine(athena=clients.athena, bucket=bucket, database=database,
                                workgroup=workgroup)
        return DuckDbEngine(s3=clients.s3, bucket=bucket, database=database, model=model,
                            partitions=partitions, workdir=workdir)

    return make
