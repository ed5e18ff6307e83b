"""Dataset snapshots: the exact list of raw objects a model version is trained on.

A version trains on *all* of its model's raw objects up to the moment the
training starts (not only the new ones): the models are small, a full retrain
is cheap, and the champion is scored on the same holdout so the comparison is
fair. The snapshot makes that data set reproducible even as new objects arrive:

- `datasets/<model>/v<NNNNN>/manifest.json`:
  `{"model", "version", "bucket", "created_at", "train_manifest",
    "objects": [{"key", "size", "etag", "records"}, ...],
    "labels": [{"key", "size", "etag"}, ...],  (operator verdicts, `labels/<model>/`)
    "total": {"objects", "records", "bytes"}}`
- `datasets/<model>/v<NNNNN>/train.manifest`: the same keys as a SageMaker
  ManifestFile, `[{"prefix": "s3://<bucket>/"}, "raw/...", ...]`, which the
  `train` channel points at (SageMaker downloads exactly these objects).

Record counts come from each object's `record-count` metadata (ingest writes
it); objects whose key and ETag the previous snapshot already lists reuse its
count, so a snapshot costs one HEAD per *new* object, not per object.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chalicelib import layout

RECORD_COUNT_METADATA = "record-count"
RAW_SUFFIXES = (".jsonl.gz", ".jsonl")


@dataclass(frozen=True)
class RawObject:
    key: str
    size: int
    etag: str
    records: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "etag": self.etag, "records": self.records}


@dataclass(frozen=True)
class DatasetSnapshot:
    model: str
    version: int
    bucket: str
    dataset_key: str
    manifest_key: str
    objects: tuple[RawObject, ...]
    created_at: str

    @property
    def records(self) -> int:
        return sum(o.records for o in self.objects)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def summary(self) -> dict[str, int]:
        return {"objects": len(self.objects), "records": self.records, "bytes": self.size}


class UnreadableObjectError(ValueError):
    """A raw object whose records cannot be counted (corrupt gzip): retrying will not help."""


def is_raw_data_key(key: str) -> bool:
    return key.startswith(f"{layout.RAW}/") and key.endswith(RAW_SUFFIXES)


def count_records(s3: Any, bucket: str, key: str, metadata: dict[str, str] | None = None) -> int:
    """Records in a raw object: its `record-count` metadata, else its non-empty lines."""
    if metadata is None:
        metadata = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {})
    value = (metadata or {}).get(RECORD_COUNT_METADATA)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            pass  # a bad value: count the lines instead
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if key.endswith(".gz"):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise UnreadableObjectError(f"s3://{bucket}/{key} is not readable gzip: {exc}") \
                from None
    return sum(1 for line in body.splitlines() if line.strip())


def list_raw_objects(s3: Any, bucket: str, model: str) -> list[dict[str, Any]]:
    """Every raw data object of the model (ListObjectsV2 entries), in key order."""
    out: list[dict[str, Any]] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=layout.raw_prefix(model)):
        out.extend(o for o in page.get("Contents", []) if is_raw_data_key(o["Key"]))
    out.sort(key=lambda o: o["Key"])
    return out


def has_raw_data(s3: Any, bucket: str, model: str) -> bool:
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=layout.raw_prefix(model)):
        if any(is_raw_data_key(o["Key"]) for o in page.get("Contents", [])):
            return True
    return False


def previous_counts(s3: Any, bucket: str, model: str, version: int) -> dict[tuple[str, str], int]:
    """(key, etag) -> records from the newest snapshot older than `version` (if any)."""
    prefix = f"{layout.DATASETS}/{model}/"
    best: str | None = None
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            key = o["Key"]
            if key.endswith("/manifest.json") and key < layout.dataset_key(model, version):
                best = key if best is None or key > best else best
    if best is None:
        return {}
    try:
        doc = json.loads(s3.get_object(Bucket=bucket, Key=best)["Body"].read())
        return {(o["key"], o["etag"]): int(o["records"]) for o in doc.get("objects", [])}
    except (ValueError, KeyError, TypeError):
        return {}  # an unreadable old snapshot only costs HEAD requests


def list_label_objects(s3: Any, bucket: str, model: str) -> list[dict[str, Any]]:
    """Every verdict object of the model (`mledge label`), in key (= time) order."""
    out: list[dict[str, Any]] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=layout.labels_prefix(model)):
        out.extend(o for o in page.get("Contents", []) if o["Key"].endswith(".jsonl.gz"))
    out.sort(key=lambda o: o["Key"])
    return out


def label_entries(s3: Any, bucket: str, model: str) -> list[dict[str, Any]]:
    """The manifest entries (`key`, `size`, `etag`) of every verdict object, in key order."""
    return [{"key": o["Key"], "size": int(o.get("Size", 0)), "etag": o.get("ETag", "").strip('"')}
            for o in list_label_objects(s3, bucket, model)]


def write_snapshot(s3: Any, bucket: str, model: str, version: int,
                   now: datetime | None = None) -> DatasetSnapshot:
    """List the model's raw objects, count their records, write both manifests."""
    known = previous_counts(s3, bucket, model, version)
    objects = []
    for entry in list_raw_objects(s3, bucket, model):
        key, etag = entry["Key"], entry.get("ETag", "").strip('"')
        records = known.get((key, etag))
        if records is None:
            records = count_records(s3, bucket, key)
        objects.append(RawObject(key=key, size=int(entry.get("Size", 0)), etag=etag,
                                 records=records))
    # Verdicts travel in the train channel beside the records (trainer.data reads both).
    labels = label_entries(s3, bucket, model)
    snapshot = DatasetSnapshot(
        model=model, version=version, bucket=bucket,
        dataset_key=layout.dataset_key(model, version),
        manifest_key=layout.sagemaker_manifest_key(model, version),
        objects=tuple(objects),
        created_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
    )
    document = {
        "model": model,
        "version": version,
        "bucket": bucket,
        "created_at": snapshot.created_at,
        "train_manifest": snapshot.manifest_key,
        "objects": [o.to_dict() for o in objects],
        "labels": labels,
        "total": snapshot.summary(),
    }
    train_manifest: list[Any] = [{"prefix": f"s3://{bucket}/"}, *(o.key for o in objects),
                                 *(label["key"] for label in labels)]
    s3.put_object(Bucket=bucket, Key=snapshot.manifest_key,
                  Body=json.dumps(train_manifest).encode(), ContentType="application/json")
    s3.put_object(Bucket=bucket, Key=snapshot.dataset_key,
                  Body=json.dumps(document, indent=1).encode(), ContentType="application/json")
    return snapshot
