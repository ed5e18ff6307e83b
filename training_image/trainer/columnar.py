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
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data import Dataset, load_dataset
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
                filled = _take(batch, n_features, with_labels, features, labels, ids, filled,
                               skipped)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path.relative_to(channel)}: unreadable Parquet: {exc}") from None
    reasons = {reason: n for reason, n in skipped.items() if n}
    return Dataset(ids, features[:filled], labels[:filled] if labels is not None else None,
                   len(files), sum(reasons.values()), reasons)


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _none(n: int) -> pa.Array:
    return pa.array(np.zeros(n, dtype=bool))


def _take(batch: pa.RecordBatch, n_features: int, with_labels: bool, features: np.ndarray,
          labels: np.ndarray | None, ids: list[str], filled: int,
          skipped: Counter[str]) -> int:
    """Copy the usable rows of one batch into the matrix; returns the new fill level."""
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
    id_values = batch.column("id").to_pylist()
    ids.extend(id_values[i] for i in rows)
    return end
