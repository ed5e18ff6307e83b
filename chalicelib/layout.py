"""The S3 layout (docs/architecture.md): one function per kind of key, nothing else builds keys."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import unquote_plus

RAW = "raw"
QUARANTINE = "quarantine"
SUMMARIES = "summaries"
DATASETS = "datasets"
MODELS = "models"
RELEASES = "releases"
LABELS = "labels"
COMPACTED = "compacted"
"""Parquet compacted from raw/: `compacted/<model>/dt=YYYY-MM-DD/<part>.parquet`."""
COMPACTION_LEDGERS = "compacted-ledgers"
"""One JSON ledger per compacted partition, outside the table's data prefix."""


def _partition(when: datetime) -> str:
    return f"dt={when:%Y-%m-%d}/hour={when:%H}"


def raw_key(model: str, when: datetime, batch_id: str) -> str:
    return f"{RAW}/{model}/{_partition(when)}/{batch_id}.jsonl.gz"


def quarantine_key(model: str, when: datetime, batch_id: str) -> str:
    """Rejected records of one batch; `model` is `_unknown` when the record named none we know."""
    return f"{QUARANTINE}/{model}/{_partition(when)}/{batch_id}.jsonl.gz"


def summaries_key(model: str, when: datetime, batch_id: str) -> str:
    return f"{SUMMARIES}/{model}/{_partition(when)}/{batch_id}.jsonl.gz"


def raw_prefix(model: str) -> str:
    return f"{RAW}/{model}/"


def raw_day_prefix(model: str, day: str) -> str:
    """Every raw object of one model and UTC day (`day` is YYYY-MM-DD), all hours."""
    return f"{RAW}/{model}/dt={day}/"


def compacted_prefix(model: str) -> str:
    return f"{COMPACTED}/{model}/"


def compacted_partition_prefix(model: str, day: str) -> str:
    """One Athena partition (model, dt): the Glue table's location template matches this."""
    return f"{COMPACTED}/{model}/dt={day}/"


def compacted_part_key(model: str, day: str, run: int, digest: str) -> str:
    return f"{compacted_partition_prefix(model, day)}part-{run:013d}-{digest}.parquet"


def compaction_ledger_key(model: str, day: str) -> str:
    return f"{COMPACTION_LEDGERS}/{model}/dt={day}.json"


def dataset_data_prefix(model: str, version: int) -> str:
    """Where a version's built dataset (Parquet, from DuckDB or Athena UNLOAD) lives."""
    return f"{DATASETS}/{model}/v{version:05d}/data/"


def dataset_key(model: str, version: int) -> str:
    """The dataset snapshot (list of raw objects) a version was trained on."""
    return f"{DATASETS}/{model}/v{version:05d}/manifest.json"


def sagemaker_manifest_key(model: str, version: int) -> str:
    """The same snapshot as a SageMaker ManifestFile for the `train` channel."""
    return f"{DATASETS}/{model}/v{version:05d}/train.manifest"


def training_output_prefix(model: str) -> str:
    return f"{MODELS}/{model}/"


def training_job_output_prefix(model: str, job_name: str) -> str:
    """Where SageMaker (and the Batch and local backends) write one job's output."""
    return f"{training_output_prefix(model)}{job_name}/output/"


def training_artifact_key(model: str, job_name: str) -> str:
    """A job's `model.tar.gz`."""
    return f"{training_job_output_prefix(model, job_name)}model.tar.gz"


def champion_key(model: str, version: int) -> str:
    return f"{RELEASES}/{model}/v{version:05d}/model.onnx"


def release_prefix(model: str, version: int) -> str:
    return f"{RELEASES}/{model}/v{version:05d}/"


def release_golden_key(model: str, version: int) -> str:
    return f"{release_prefix(model, version)}golden.json"


def release_metrics_key(model: str, version: int) -> str:
    return f"{release_prefix(model, version)}metrics.json"


def release_full_key(model: str, version: int, encoding: str) -> str:
    """The full model, compressed with `encoding` (the job document's `full`)."""
    return f"{release_prefix(model, version)}model.onnx.{encoding}"


def release_delta_key(model: str, version: int, from_version: int, codec: str) -> str:
    return f"{release_prefix(model, version)}deltas/from-v{from_version:05d}.{codec}"


def release_manifest_key(model: str, version: int) -> str:
    return f"{release_prefix(model, version)}manifest.json"


def rollback_manifest_key(model: str, version: int, job_id: str) -> str:
    """A rollback's manifest: one per rollback job, beside the release's own."""
    return f"{release_prefix(model, version)}rollback-{job_id}.json"


def model_of_raw_key(key: str) -> str | None:
    """The model a `raw/` key belongs to; S3 event keys arrive URL-encoded."""
    parts = unquote_plus(key).split("/")
    if len(parts) >= 3 and parts[0] == RAW and parts[1]:
        return parts[1]
    return None


def labels_prefix(model: str) -> str:
    """Operator verdicts on readings (`mledge label`); every snapshot includes them."""
    return f"{LABELS}/{model}/"


def labels_key(model: str, when: datetime, action: str) -> str:
    # Time first: the trainer reads files in key order and the last verdict wins.
    return f"{labels_prefix(model)}{when:%Y%m%dT%H%M%S%f}-{action}.jsonl.gz"
