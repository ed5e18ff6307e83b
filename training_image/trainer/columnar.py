"""Loading a Parquet train channel in batches, with memory bounded by the instance.

A model whose pipeline config has a `dataset` table trains on a dataset built by SQL
(chalicelib/datasets.py): Parquet files with the columns `DATASET_COLUMNS` there
(`id`, `features` as a list of numbers, `label`, `sample_key`, ...). Instead of
parsing JSON into Python objects, the files are read one record batch at a time
(`BATCH_ROWS` rows) straight into a preallocated float32 matrix, so the peak is the
matrix itself plus one batch, whatever the files hold.

Every family here fits on all rows in memory, so the matrix must fit the instance:
`max_rows_for` derives a row budget from the memory the container may use
(`MEMORY_FRACTION` of its cgroup limit, else of physical memory). When the files
hold more rows, the loader keeps a uniform sample by `sample_key` (the same per-record
number the dataset sample used; the stride of rows for files without it) and says so
in the log and in the skipped reasons. Rows that cannot be used are skipped and
counted under the same reasons as the JSON-lines loader (trainer.data).

The dataset build already keeps one copy per record id, so this loader does not
de-duplicate again (that would cost a set of every id).

Weights and verdicts match the JSON-lines loader's: each row weighs
`1 / (inclusion_p * sample_p)` (how likely the device sent it, times how likely the
dataset's sample took it; a missing value counts as 1, a value outside (0, 1] skips
the row), `reason == "flagged"` marks a flagged reading, and the verdict lines
(`labels/`, gzip JSON lines) that travel beside the Parquet files give the verdicts.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mledge_update.uplink import FLAGGED, INCLUSION_FIELD, REASON_FIELD

from trainer.data import Dataset, list_data_files, load_dataset, load_verdicts
from trainer.errors import DataError

PARQUET_PATTERN = "*.parquet"
BATCH_ROWS = 65_536
MEMORY_FRACTION = 0.25
"""Of the container's memory, what the feature matrix may take (fit needs copies of it)."""
ROW_OVERHEAD_BYTES = 120
"""Per row besides the features: the id string and its list slot, the label."""
MEMORY_ENV = "MLEDGE_TRAINER_MEMORY_BYTES"
"""Overrides the detected memory (tests, and instances whose cgroup says nothing)."""
OVER_BUDGET = "over the instance's row budget (uniform sample kept)"
SAMPLE_P = "sample_p"
"""The dataset sample's probability of taking the row (chalicelib.datasets)."""
BAD_INCLUSION = "inclusion_p not in (0, 1]"  # the JSON-lines loader's reason, word for word
BAD_SAMPLE_P = "sample_p not in (0, 1]"


def memory_bytes() -> int:
    """The memory this process may use: env override, cgroup v2 / v1 limit, physical."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return int(override)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def max_rows_for(n_features: int, memory: int | None = None) -> int:
    memory = memory_bytes() if memory is None else memory
    return max(1, int(memory * MEMORY_FRACTION) // (n_features * 4 + ROW_OVERHEAD_BYTES))


def parquet_files(channel: Path) -> list[Path]:
    if not channel.is_dir():
        raise DataError(f"train channel not found: {channel}")
    return sorted(p for p in channel.rglob(PARQUET_PATTERN) if p.is_file())


def load_channel(channel: Path, n_features: int, *, with_labels: bool,
                 max_rows: int | None = None) -> Dataset:
    """Parquet files when the channel has any (a built dataset), else gzip JSON lines."""
    if parquet_files(channel):
        return load_parquet_dataset(channel, n_features, with_labels=with_labels,
                                    max_rows=max_rows)
    return load_dataset(channel, n_features, with_labels=with_labels)


def load_parquet_dataset(channel: Path, n_features: int, *, with_labels: bool,
                         max_rows: int | None = None) -> Dataset:
    files = parquet_files(channel)
    if not files:
        raise DataError(f"train channel {channel} holds no {PARQUET_PATTERN} files")
    try:
        opened = [pq.ParquetFile(f) for f in files]
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"unreadable Parquet file in {channel}: {exc}") from None
    total = sum(f.metadata.num_rows for f in opened)
    limit = max_rows_for(n_features) if max_rows is None else max_rows
    keep_below = min(1.0, limit / total) if total else 1.0
    stride = max(1, -(-total // limit)) if total else 1
    capacity = min(total, limit)
    features = np.empty((capacity, n_features), dtype=np.float32)
    labels = np.empty(capacity, dtype=np.int64) if with_labels else None
    weights = np.empty(capacity, dtype=np.float64)
    flagged = np.zeros(capacity, dtype=bool)
    ids: list[str] = []
    skipped: Counter[str] = Counter()
    filled = 0
    seen_rows = 0
    for handle, path in zip(opened, files, strict=True):
        names = set(handle.schema_arrow.names)
        missing = {"id", "features"} - names
        if missing:
            raise DataError(f"{path.relative_to(channel)}: no column {sorted(missing)[0]!r}")
        columns = ["id", "features"] + (["label"] if with_labels and "label" in names else [])
        columns += [c for c in (INCLUSION_FIELD, SAMPLE_P, REASON_FIELD) if c in names]
        has_key = "sample_key" in names
        if has_key:
            columns.append("sample_key")
        try:
            batches = handle.iter_batches(batch_size=BATCH_ROWS, columns=columns)
            for batch in batches:
                n = batch.num_rows
                if keep_below < 1.0:
                    if has_key:
                        keys = batch.column("sample_key")
                        chosen = pc.fill_null(pc.less(keys, keep_below), False)
                    else:
                        positions = np.arange(seen_rows, seen_rows + n)
                        chosen = pa.array(positions % stride == 0)
                    skipped[OVER_BUDGET] += n - _count(chosen)
                    batch = batch.filter(chosen)
                seen_rows += n
                filled = _take(batch, n_features, with_labels,
                               _Target(features, labels, weights, flagged, ids), filled,
                               skipped)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path.relative_to(channel)}: unreadable Parquet: {exc}") from None
    verdict_files = list_data_files(channel)
    verdicts = load_verdicts(verdict_files, channel, skipped)
    reasons = {reason: n for reason, n in skipped.items() if n}
    return Dataset(ids, features[:filled], labels[:filled] if labels is not None else None,
                   len(files) + len(verdict_files), sum(reasons.values()), reasons,
                   weights[:filled], flagged[:filled], verdicts)


@dataclass
class _Target:
    """The preallocated arrays the batches are copied into."""

    features: np.ndarray
    labels: np.ndarray | None
    weights: np.ndarray
    flagged: np.ndarray
    ids: list[str]


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _none(n: int) -> pa.Array:
    return pa.array(np.zeros(n, dtype=bool))


def _probability_ok(batch: pa.RecordBatch, name: str, n: int) -> pa.Array:
    """True where the column is null/absent (counts as 1) or in (0, 1]."""
    if name not in batch.schema.names:
        return pa.array(np.ones(n, dtype=bool))
    column = batch.column(name)
    inside = pc.and_(pc.greater(column, 0.0), pc.less_equal(column, 1.0))
    return pc.fill_null(inside, True)


def _probability(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """The column as float64 with nulls (and an absent column) as 1."""
    if name not in batch.schema.names:
        return np.ones(batch.num_rows)
    return np.asarray(pc.fill_null(pc.cast(batch.column(name), pa.float64()), 1.0)
                      .to_numpy(zero_copy_only=False), dtype=np.float64)


def _take(batch: pa.RecordBatch, n_features: int, with_labels: bool, target: _Target,
          filled: int, skipped: Counter[str]) -> int:
    """Copy the usable rows of one batch into the matrix; returns the new fill level."""
    features, labels, ids = target.features, target.labels, target.ids
    n = batch.num_rows
    room = features.shape[0] - filled
    if n == 0:
        return filled
    if room <= 0:
        skipped[OVER_BUDGET] += n
        return filled
    id_column, feats = batch.column("id"), batch.column("features")
    ok = (pc.fill_null(pc.greater(pc.utf8_length(id_column), 0), False)
          if pa.types.is_string(id_column.type) else _none(n))
    skipped["missing or non-string id"] += n - _count(ok)
    right = (pc.equal(pc.fill_null(pc.list_value_length(feats), -1), n_features)
             if pa.types.is_list(feats.type) or pa.types.is_large_list(feats.type)
             else _none(n))
    skipped["wrong feature count"] += _count(pc.and_(ok, pc.invert(right)))
    ok = pc.and_(ok, right)
    if with_labels:
        has_label = (pc.is_valid(batch.column("label")) if "label" in batch.schema.names
                     else _none(n))
        skipped["missing or non-integer label"] += _count(pc.and_(ok, pc.invert(has_label)))
        ok = pc.and_(ok, has_label)
    for name, reason in ((INCLUSION_FIELD, BAD_INCLUSION), (SAMPLE_P, BAD_SAMPLE_P)):
        inside = _probability_ok(batch, name, n)
        skipped[reason] += _count(pc.and_(ok, pc.invert(inside)))
        ok = pc.and_(ok, inside)
    batch = batch.filter(ok)
    if batch.num_rows == 0:
        return filled
    # Nulls inside a list become NaN here and are caught by the finiteness check.
    values = batch.column("features").flatten().to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = values.astype(np.float32).reshape(batch.num_rows, n_features)
    finite = np.isfinite(as32).all(axis=1)
    skipped["non-numeric or non-finite feature"] += int((~finite).sum())
    rows = np.flatnonzero(finite)[:room]
    skipped[OVER_BUDGET] += int(finite.sum()) - len(rows)
    end = filled + len(rows)
    features[filled:end] = as32[rows]
    if labels is not None:
        labels[filled:end] = batch.column("label").to_numpy(zero_copy_only=False)[rows]
    # 1 / (inclusion_p * sample_p): the stream the devices saw, not the uplink filter
    # nor the dataset's sample (docs/training.md).
    p = _probability(batch, INCLUSION_FIELD) * _probability(batch, SAMPLE_P)
    target.weights[filled:end] = (1.0 / p)[rows]
    if REASON_FIELD in batch.schema.names:
        is_flagged = pc.fill_null(pc.equal(batch.column(REASON_FIELD), FLAGGED), False)
        target.flagged[filled:end] = is_flagged.to_numpy(zero_copy_only=False)[rows]
    id_values = batch.column("id").to_pylist()
    ids.extend(id_values[i] for i in rows)
    return end
