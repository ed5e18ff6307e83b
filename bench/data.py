"""The training-data path at fleet scale: compaction, dataset build, trainer load.

    python bench/data.py                      # 1M and 10M records
    python bench/data.py --sizes 1000000      # one size
    python bench/data.py --sizes 1000000,10000000,50000000   # 50M: ~6 GB of disk, checks memory first

For each size, synthetic vibration telemetry is written the way ingest writes it
(gzip JSON lines, 1000 records per object, `raw/<model>/dt=<day>/hour=<hh>/`, spread
over days), then, each phase in a fresh child process so its peak RSS is its own (the data is
written by a child too: Linux carries a parent's peak RSS into its children):

- **compact**: the real `chalicelib.compaction.Compactor` turns every day into Parquet
  (records/s, peak RSS);
- **build**: the real `chalicelib.datasets.build_dataset` on DuckDB (counts query,
  allocation, dataset query, COPY to Parquet) for a dataset of `--max-records` rows
  (the pipeline.toml default, 2M) over the whole window, stratified by day;
- **load**: the trainer's `load_channel` on that dataset (seconds, peak RSS);

and beside them **today's path**, the trainer's JSON-lines loader (`load_dataset`) over
every raw object, at the sizes it can still do (`--today-max`, default 1M: it needs
~470 MB per million records and grows linearly).

S3 is a directory here (`LocalS3`: the calls the code makes, on files), so the figures
are CPU and disk, not network. Targets (issue 19): trainer memory flat in dataset size;
dataset build on 50M records under 60 s with DuckDB.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "training_image")]

MODEL = "vibration-anomaly"
PER_OBJECT = 1000
RECORDS_PER_DAY = 1_000_000
FIRST_DAY = datetime(2026, 1, 1, tzinfo=UTC)
GIB = 2**30
DUCKDB_MEMORY = "4GB"
"""The machine is shared: DuckDB spills past this instead of taking 80 % of RAM."""


# ------------------------------------------------------------------ a directory as S3


class _Body(io.BytesIO):
    pass


class LocalS3:
    """The S3 calls compaction and dataset builds make, on files under one directory."""

    META = ".s3meta"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def _etag(self, path: Path) -> str:
        st = path.stat()
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, Metadata: dict | None = None,
                   IfMatch: str | None = None, IfNoneMatch: str | None = None,
                   **_: Any) -> dict[str, Any]:
        path = self._path(Key)
        if IfNoneMatch == "*" and path.exists():
            raise _client_error("PreconditionFailed")
        if IfMatch is not None and (not path.exists() or self._etag(path) != IfMatch):
            raise _client_error("PreconditionFailed")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Body)
        if Metadata:
            path.with_name(path.name + self.META).write_text(json.dumps(Metadata))
        return {"ETag": self._etag(path)}

    def get_object(self, *, Bucket: str, Key: str, Range: str | None = None) -> dict[str, Any]:
        path = self._path(Key)
        if not path.exists():
            raise _client_error("NoSuchKey")
        if Range:
            start, end = (int(x) for x in Range.removeprefix("bytes=").split("-"))
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(end - start + 1)
        else:
            data = path.read_bytes()
        return {"Body": _Body(data), "Metadata": self._metadata(path), "ETag": self._etag(path)}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        path = self._path(Key)
        return {"Metadata": self._metadata(path), "ContentLength": path.stat().st_size}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._path(Key).unlink(missing_ok=True)
        return {}

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(filename, path)

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        shutil.copyfile(self._path(key), filename)

    def _metadata(self, path: Path) -> dict[str, str]:
        meta = path.with_name(path.name + self.META)
        return json.loads(meta.read_text()) if meta.exists() else {}

    def get_paginator(self, name: str) -> Any:
        assert name == "list_objects_v2"
        return self

    def paginate(self, *, Bucket: str, Prefix: str, Delimiter: str | None = None):
        base = self._path(Prefix.rsplit("/", 1)[0]) if "/" in Prefix else self.root
        contents, prefixes = [], set()
        if base.exists():
            for dirpath, _, names in os.walk(base):
                for name in names:
                    if name.endswith(self.META):
                        continue
                    key = str(Path(dirpath, name).relative_to(self.root))
                    if not key.startswith(Prefix):
                        continue
                    rest = key[len(Prefix):]
                    if Delimiter and Delimiter in rest:
                        prefixes.add(Prefix + rest.split(Delimiter, 1)[0] + Delimiter)
                        continue
                    st = Path(dirpath, name).stat()
                    contents.append({"Key": key, "Size": st.st_size,
                                     "ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"'})
        yield {"Contents": sorted(contents, key=lambda o: o["Key"]),
               "CommonPrefixes": [{"Prefix": p} for p in sorted(prefixes)]}


def _client_error(code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "LocalS3")


# ------------------------------------------------------------------ data


def write_raw(root: Path, n: int, seed: int = 1) -> tuple[int, int, int]:
    """n vibration readings as ingest writes them; returns (objects, bytes, days)."""
    import numpy as np

    from chalicelib import layout

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, size=(4, 8))
    s3 = LocalS3(root)
    objects = size = 0
    days = max(1, -(-n // RECORDS_PER_DAY))
    for start in range(0, n, PER_OBJECT):
        count = min(PER_OBJECT, n - start)
        feats = centers[rng.integers(0, 4, count)] + rng.normal(0, 0.5, size=(count, 8))
        day = start // RECORDS_PER_DAY
        when = FIRST_DAY + timedelta(days=day, hours=(start // PER_OBJECT) % 24)
        received = int(when.timestamp() * 1000)
        lines = []
        for i in range(count):
            rid = f"pump-{(start + i) % 1000:03d}-{start + i}"
            f = ",".join(f"{v:.6g}" for v in feats[i])
            lines.append(f'{{"id":"{rid}","thing":"pump-{(start + i) % 1000:03d}",'
                         f'"model":"{MODEL}","ts":{received / 1000 + i * 0.001:.3f},'
                         f'"received_at":{received},"features":[{f}]}}')
        body = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1, mtime=0)
        batch = hashlib.sha256(f"{seed}-{start}".encode()).hexdigest()[:32]
        s3.put_object(Bucket="bench", Key=layout.raw_key(MODEL, when, batch), Body=body,
                      Metadata={"record-count": str(count)})
        objects += 1
        size += len(body)
    return objects, size, days


def write_compacted(root: Path, n: int, seed: int = 2) -> int:
    """n rows straight into compacted parts and ledgers (no raw/): for the build and load
    phases at sizes whose JSON would take too long to write here. Ids and features as in
    write_raw; sample_key uniform from a seeded generator (compaction takes it from
    SHA-256 of the id, equally uniform). Returns the number of days."""
    import numpy as np
    import pyarrow as pa

    from chalicelib import layout
    from chalicelib.compaction import COMPACTED_SCHEMA, Ledger, LedgerPart, parquet_bytes

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, size=(4, 8))
    s3 = LocalS3(root)
    days = max(1, -(-n // RECORDS_PER_DAY))
    for day in range(days):
        count = min(RECORDS_PER_DAY, n - day * RECORDS_PER_DAY)
        first = day * RECORDS_PER_DAY
        when = FIRST_DAY + timedelta(days=day)
        feats = centers[rng.integers(0, 4, count)] + rng.normal(0, 0.5, size=(count, 8))
        ids = [f"pump-{i % 1000:03d}-{i}" for i in range(first, first + count)]
        received = int(when.timestamp() * 1000)
        table = pa.table({
            "id": ids, "thing": [i[:8] for i in ids],
            "ts": np.full(count, received / 1000), "received_at": np.full(count, received),
            "features": pa.FixedSizeListArray.from_arrays(feats.ravel(), 8).cast(
                pa.list_(pa.float64())),
            "label": pa.nulls(count, pa.int64()), "model_version": pa.nulls(count, pa.int64()),
            "score": pa.nulls(count, pa.float64()), "anomaly": pa.nulls(count, pa.bool_()),
            "reason": pa.nulls(count, pa.string()),
            "inclusion_p": pa.nulls(count, pa.float64()),
            "sample_key": rng.random(count), "source": ["direct"] * count,
            "compaction_run": np.full(count, 1, dtype=np.int64)}, schema=COMPACTED_SCHEMA)
        day_text = when.date().isoformat()
        key = layout.compacted_part_key(MODEL, day_text, 1, "direct")
        body = parquet_bytes(table)
        s3.put_object(Bucket="bench", Key=key, Body=body)
        ledger = Ledger(model=MODEL, day=day_text, parts=[LedgerPart(
            key=key, run=1, records=count, bytes=len(body), sources=(("direct", count),))])
        s3.put_object(Bucket="bench", Key=layout.compaction_ledger_key(MODEL, day_text),
                      Body=ledger.to_json())
    return days


# ------------------------------------------------------------------ child phases


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_compact(root: Path) -> dict[str, Any]:
    from chalicelib.compaction import Compactor

    s3 = LocalS3(root)
    compactor = Compactor(s3=s3, bucket="bench")
    started = time.perf_counter()
    records = parts = 0
    for day in compactor.raw_days(MODEL):
        result = compactor.compact_partition(MODEL, day, run=int(time.time() * 1000))
        records += result.records_written
        parts += len(result.parts_written)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in (root / "compacted").rglob("*.parquet"))
    return {"records": records, "parts": parts, "seconds": seconds, "parquet_bytes": size,
            "peak_mb": _peak_mb()}


def phase_build(root: Path, max_records: int, days: int) -> dict[str, Any]:
    from chalicelib.config import parse_pipeline_config
    from chalicelib.datasets import DuckDbEngine, build_dataset

    config = parse_pipeline_config({"models": {MODEL: {
        "family": "kmeans_anomaly", "metric": "silhouette", "threshold": 0.1,
        "thing_group": "g", "schema": {"features": [f"f{i}" for i in range(8)]},
        "dataset": {"window_days": days, "max_records": max_records,
                    "stratify_by": ["day"], "engine": "duckdb"}}}})
    s3 = LocalS3(root)

    def engine(name: str, partitions, workdir: Path):
        return DuckDbEngine(s3=s3, bucket="bench", database="mledge_bench_data", model=MODEL,
                            partitions=partitions, workdir=workdir, local_root=root,
                            memory_limit=DUCKDB_MEMORY)

    now = (FIRST_DAY + timedelta(days=days - 1, hours=23)).timestamp()
    shutil.rmtree(root / "datasets", ignore_errors=True)
    started = time.perf_counter()
    built = build_dataset(config.models[MODEL], 1, s3=s3, bucket="bench",
                          database="mledge_bench_data", engine_factory=engine, now=now,
                          workdir=root.parent)
    return {"seconds": time.perf_counter() - started, "records": built.snapshot.records,
            "phases": built.seconds, "peak_mb": _peak_mb()}


def phase_load(channel: Path, kind: str) -> dict[str, Any]:
    from trainer.columnar import load_parquet_dataset
    from trainer.data import load_dataset

    started = time.perf_counter()
    if kind == "parquet":
        data = load_parquet_dataset(channel, 8, with_labels=False)
    else:
        data = load_dataset(channel, 8, with_labels=False)
    return {"seconds": time.perf_counter() - started, "records": len(data),
            "peak_mb": _peak_mb()}


def child(*args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "training_image")]))
    done = subprocess.run([sys.executable, __file__, "--child", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--max-records", type=int, default=2_000_000,
                        help="dataset size cap (default 2,000,000, pipeline.toml's default)")
    parser.add_argument("--today-max", type=int, default=1_000_000,
                        help="largest size to also load the JSON-lines way (default 1M)")
    parser.add_argument("--direct-sizes", default="",
                        help="sizes to write straight as compacted Parquet (no raw JSON, no "
                             "compaction figure): the build and load phases at 50M here")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, *rest = args.child
        if phase == "raw":
            objects, size, days = write_raw(Path(rest[0]), int(rest[1]))
            result = {"objects": objects, "bytes": size, "days": days}
        elif phase == "direct":
            result = {"days": write_compacted(Path(rest[0]), int(rest[1]))}
        elif phase == "compact":
            result = phase_compact(Path(rest[0]))
        elif phase == "build":
            result = phase_build(Path(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = phase_load(Path(rest[0]), rest[1])
        print("BENCH " + json.dumps(result))
        return

    import psutil

    sizes = [int(s) for s in args.sizes.split(",") if s]
    direct = [int(s) for s in args.direct_sizes.split(",") if s]
    print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} "
          f"available={psutil.virtual_memory().available / GIB:.1f} GiB "
          f"python={sys.version.split()[0]} dataset cap={args.max_records:,}")
    print(f"{'records':>11} {'raw MB':>7} {'compact s':>9} {'rec/s':>9} {'cmp MB':>7} "
          f"{'parquet MB':>10} {'build s':>8} {'bld MB':>7} {'rows':>9} "
          f"{'load s':>7} {'load MB':>8} | {'today load s':>12} {'today MB':>9}", flush=True)
    workroot = args.workdir or Path(tempfile.mkdtemp(prefix="mledge-bench-data-"))
    try:
        for n in [*sizes, *(-d for d in direct)]:
            if n < 0:
                run_direct(workroot, -n, args.max_records)
                continue
            need_gib = n * 130 / GIB  # raw gzip + Parquet on disk
            free = shutil.disk_usage(workroot).free / GIB
            if need_gib > free * 0.8:
                print(f"{n:>11,} skipped: needs ~{need_gib:.0f} GiB of disk, {free:.0f} free")
                continue
            root = workroot / f"n{n}" / "bucket"
            shutil.rmtree(root.parent, ignore_errors=True)
            root.mkdir(parents=True)
            # Every phase in its own process: Linux carries a parent's peak RSS into
            # a child across fork + exec, so the parent must stay small.
            written = child("raw", str(root), str(n))
            raw_bytes, days = written["bytes"], written["days"]
            compact = child("compact", str(root))
            build = child("build", str(root), str(args.max_records), str(days))
            channel = root / "datasets"
            load = child("load", str(channel), "parquet")
            today = "-", "-"
            if n <= args.today_max:
                t = child("load", str(root / "raw"), "jsonl")
                today = f"{t['seconds']:.1f}", f"{t['peak_mb']:.0f}"
            print(f"{n:>11,} {raw_bytes / 1e6:>7.0f} {compact['seconds']:>9.1f} "
                  f"{compact['records'] / compact['seconds']:>9,.0f} {compact['peak_mb']:>7.0f} "
                  f"{compact['parquet_bytes'] / 1e6:>10.0f} {build['seconds']:>8.1f} "
                  f"{build['peak_mb']:>7.0f} {build['records']:>9,} {load['seconds']:>7.1f} "
                  f"{load['peak_mb']:>8.0f} | {today[0]:>12} {today[1]:>9}", flush=True)
            assert compact["records"] == n, "compaction lost or duplicated records"
            shutil.rmtree(root.parent, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workroot, ignore_errors=True)


def run_direct(workroot: Path, n: int, max_records: int) -> None:
    root = workroot / f"d{n}" / "bucket"
    shutil.rmtree(root.parent, ignore_errors=True)
    root.mkdir(parents=True)
    days = child("direct", str(root), str(n))["days"]
    parquet_mb = sum(p.stat().st_size for p in (root / "compacted").rglob("*.parquet")) / 1e6
    build = child("build", str(root), str(max_records), str(days))
    load = child("load", str(root / "datasets"), "parquet")
    print(f"{n:>11,} {'-':>7} {'(direct)':>9} {'-':>9} {'-':>7} {parquet_mb:>10.0f} "
          f"{build['seconds']:>8.1f} {build['peak_mb']:>7.0f} {build['records']:>9,} "
          f"{load['seconds']:>7.1f} {load['peak_mb']:>8.0f} | {'-':>12} {'-':>9}", flush=True)
    shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
