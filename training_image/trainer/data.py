"""Loading the train channel: every `*.jsonl.gz` under it, one telemetry record per line.

Records are the normalised lines ingest writes (`{"id", "thing", "model", "ts",
"received_at", "features": [...], "label"?: int, "reason"?, "inclusion_p"?}`).
`reason` / `inclusion_p` say why the device sent the reading (no model yet, in the
random sample at rate p, flagged by its model): each record's training weight is
`1 / inclusion_p` (1 without the fields), so the dataset represents the stream the
devices saw, not the filter that thinned it (docs/training.md).

Verdict lines (`{"verdict_of": "<record id>", "verdict": "fault" | "normal", ...}`,
written by `mledge label` under `labels/`) travel in the same channel; the last verdict
per record id (files in path order) wins. A record that cannot be used
(not an object, no string id, wrong feature count, a non-number or non-finite
feature, a missing label where labels are needed) is skipped and counted, never
fatal; a file that is not valid gzip is fatal, because silently training on part
of a snapshot would make the run irreproducible.

Speed: each file is parsed with one `json.loads` over the whole file (the lines
joined into a JSON array), falling back to line-by-line parsing only for a file
with a bad line; features are turned into float32 arrays in chunks, so Python
lists never hold more than one chunk of floats.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mledge_update.uplink import FLAGGED, INCLUSION_FIELD, REASON_FIELD

from trainer.errors import DataError

CHUNK_ROWS = 50_000
FILE_PATTERN = "*.jsonl.gz"
VERDICT_OF = "verdict_of"
VERDICT = "verdict"
FAULT = "fault"
NORMAL = "normal"
VERDICTS = (FAULT, NORMAL)


@dataclass
class Dataset:
    """Usable records in file order (files sorted by path): ids, float32 features, labels."""

    ids: list[str]
    features: np.ndarray
    labels: np.ndarray | None
    files: int
    skipped: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    weights: np.ndarray | None = None
    """1 / inclusion_p per record (float64); None means all 1."""
    flagged: np.ndarray | None = None
    """True for records the device sent because its model flagged them."""
    verdicts: dict[str, str] = field(default_factory=dict)
    """Operator / rule verdicts by record id: "fault" or "normal"."""

    def __len__(self) -> int:
        return len(self.ids)

    def weight_array(self) -> np.ndarray:
        return self.weights if self.weights is not None else np.ones(len(self.ids))

    def flagged_array(self) -> np.ndarray:
        return self.flagged if self.flagged is not None else np.zeros(len(self.ids), dtype=bool)

    def subset(self, mask: np.ndarray) -> Dataset:
        """The records where `mask` is True (verdicts and counts kept)."""
        idx = np.flatnonzero(mask)
        return Dataset(
            [self.ids[i] for i in idx], self.features[idx],
            self.labels[idx] if self.labels is not None else None, self.files, self.skipped,
            dict(self.skipped_reasons), self.weight_array()[idx], self.flagged_array()[idx],
            dict(self.verdicts))


@dataclass
class Split:
    """One side of the holdout split."""

    ids: list[str]
    features: np.ndarray
    labels: np.ndarray | None
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def weight_array(self) -> np.ndarray:
        return self.weights if self.weights is not None else np.ones(len(self.ids))

    @property
    def weighted(self) -> bool:
        """True unless every weight is 1 (then unweighted code paths give the same result)."""
        return self.weights is not None and bool(np.any(self.weights != 1.0))


def list_data_files(channel: Path) -> list[Path]:
    if not channel.is_dir():
        raise DataError(f"train channel not found: {channel}")
    return sorted(p for p in channel.rglob(FILE_PATTERN) if p.is_file())


def _read_records(path: Path, channel: Path) -> tuple[list[Any], int]:
    """All JSON values in one gzip JSON-lines file, plus the count of lines that did not parse."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"corrupt gzip file {path.relative_to(channel)}: {exc}") from None
    lines = [line for line in raw.splitlines() if line.strip()]
    if not lines:
        return [], 0
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]")
        if len(records) == len(lines):
            return records, 0
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    records, bad = [], 0
    for line in lines:
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
    return records, bad


class _Accumulator:
    """Collects accepted rows and converts them to float32 arrays a chunk at a time."""

    def __init__(self, n_features: int, with_labels: bool) -> None:
        self.n_features = n_features
        self.with_labels = with_labels
        self.ids: list[str] = []
        self.blocks: list[np.ndarray] = []
        self.label_blocks: list[np.ndarray] = []
        self.weight_blocks: list[np.ndarray] = []
        self.flag_blocks: list[np.ndarray] = []
        self.verdicts: dict[str, str] = {}
        self.skipped: Counter[str] = Counter()
        self._ids: list[str] = []
        self._rows: list[list[Any]] = []
        self._labels: list[int] = []
        self._weights: list[float] = []
        self._flags: list[bool] = []
        # Ingest is replay-safe per batch, but SQS may redeliver a message inside another
        # batch (docs/ingestion.md): the same record id can then sit in two raw objects.
        # The first copy (files in path order) is kept.
        self._seen: set[str] = set()

    def add(self, records: Iterable[Any]) -> None:
        n, with_labels = self.n_features, self.with_labels
        ids, rows, labels, skipped = self._ids, self._rows, self._labels, self.skipped
        weights, flags = self._weights, self._flags
        seen = self._seen
        for rec in records:
            if type(rec) is not dict:
                skipped["not a JSON object"] += 1
                continue
            if VERDICT_OF in rec:
                self._verdict(rec)
                continue
            rid = rec.get("id")
            if type(rid) is not str or not rid:
                skipped["missing or non-string id"] += 1
                continue
            if rid in seen:
                skipped["duplicate id"] += 1
                continue
            feats = rec.get("features")
            if type(feats) is not list or len(feats) != n:
                skipped["wrong feature count"] += 1
                continue
            if with_labels:
                label = rec.get("label")
                if type(label) is not int:
                    skipped["missing or non-integer label"] += 1
                    continue
                if not -(2**63) <= label < 2**63:  # would fail the whole int64 label array
                    skipped["label outside the int64 range"] += 1
                    continue
                labels.append(label)
            weight = _weight(rec.get(INCLUSION_FIELD))
            if weight is None:
                skipped["inclusion_p not in (0, 1]"] += 1
                if with_labels:
                    labels.pop()
                continue
            seen.add(rid)
            ids.append(rid)
            rows.append(feats)
            weights.append(weight)
            flags.append(rec.get(REASON_FIELD) == FLAGGED)
        if len(rows) >= CHUNK_ROWS:
            self.flush()

    def _verdict(self, rec: dict[str, Any]) -> None:
        _add_verdict(rec, self.verdicts, self.skipped)

    def flush(self) -> None:
        if not self._rows:
            return
        matrix, keep = _to_matrix(self._rows, self.n_features)
        bad = int(len(keep) - keep.sum())
        if bad:
            self.skipped["non-numeric or non-finite feature"] += bad
            matrix = matrix[keep]
        self.blocks.append(matrix)
        self.ids.extend(i for i, k in zip(self._ids, keep, strict=True) if k)
        if self.with_labels:
            self.label_blocks.append(np.asarray(self._labels, dtype=np.int64)[keep])
        self.weight_blocks.append(np.asarray(self._weights, dtype=np.float64)[keep])
        self.flag_blocks.append(np.asarray(self._flags, dtype=bool)[keep])
        self._ids, self._rows, self._labels, self._weights, self._flags = [], [], [], [], []

    def dataset(self, files: int) -> Dataset:
        self.flush()
        features = (np.concatenate(self.blocks) if self.blocks
                    else np.empty((0, self.n_features), dtype=np.float32))
        labels = None
        if self.with_labels:
            labels = (np.concatenate(self.label_blocks) if self.label_blocks
                      else np.empty(0, dtype=np.int64))
        weights = (np.concatenate(self.weight_blocks) if self.weight_blocks
                   else np.empty(0, dtype=np.float64))
        flagged = (np.concatenate(self.flag_blocks) if self.flag_blocks
                   else np.empty(0, dtype=bool))
        return Dataset(self.ids, features, labels, files, sum(self.skipped.values()),
                       dict(self.skipped), weights, flagged, dict(self.verdicts))


def _add_verdict(rec: dict[str, Any], verdicts: dict[str, str], skipped: Counter[str]) -> None:
    rid, verdict = rec.get(VERDICT_OF), rec.get(VERDICT)
    if type(rid) is not str or not rid or verdict not in VERDICTS:
        skipped["unusable verdict line"] += 1
        return
    verdicts[rid] = verdict


def load_verdicts(files: list[Path], channel: Path, skipped: Counter[str]) -> dict[str, str]:
    """The verdict lines of `files` (gzip JSON lines, in the given order; the last verdict
    per record id wins). For a channel whose records are elsewhere (Parquet): any other
    line is counted in `skipped`, never read as a record."""
    verdicts: dict[str, str] = {}
    for path in files:
        records, bad_lines = _read_records(path, channel)
        if bad_lines:
            skipped["line is not valid JSON"] += bad_lines
        for rec in records:
            if type(rec) is dict and VERDICT_OF in rec:
                _add_verdict(rec, verdicts, skipped)
            else:
                skipped["not a verdict line (the records are Parquet)"] += 1
    return verdicts


def _weight(p: Any) -> float | None:
    """1 / inclusion_p; 1 when absent (records from agents before the field); None if bad."""
    if p is None:
        return 1.0
    if type(p) not in (int, float) or not 0.0 < p <= 1.0:
        return None
    return 1.0 / float(p)


def _to_matrix(rows: list[list[Any]], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, n_features] and a mask of rows whose features are all finite numbers."""
    try:
        array = np.array(rows)
    except (ValueError, TypeError):
        array = np.empty(0)
    if array.dtype.kind in "iuf" and array.shape == (len(rows), n_features):
        # Fast path: every value is a number. json.loads turns NaN/Infinity into floats.
        with np.errstate(over="ignore", invalid="ignore"):
            matrix = array.astype(np.float32)
        return matrix, np.asarray(np.isfinite(matrix).all(axis=1))
    # Slow path: some value is a string, bool, null, list...: check row by row.
    matrix = np.zeros((len(rows), n_features), dtype=np.float32)
    keep = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if all(type(v) is float or type(v) is int for v in row):
            with np.errstate(over="ignore", invalid="ignore"):
                matrix[i] = np.asarray(row, dtype=np.float64)
            keep[i] = bool(np.isfinite(matrix[i]).all())
    return matrix, keep


def load_dataset(channel: Path, n_features: int, *, with_labels: bool) -> Dataset:
    """Read every `*.jsonl.gz` under `channel` (recursively, sorted by path)."""
    files = list_data_files(channel)
    if not files:
        raise DataError(f"train channel {channel} holds no {FILE_PATTERN} files")
    acc = _Accumulator(n_features, with_labels)
    for path in files:
        records, bad_lines = _read_records(path, channel)
        if bad_lines:
            acc.skipped["line is not valid JSON"] += bad_lines
        acc.add(records)
    return acc.dataset(len(files))


def holdout_bucket(record_id: str) -> int:
    """0..99 from the record id alone: the first 8 bytes of SHA-256(utf-8 id), big-endian, mod 100."""
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") % 100


def holdout_mask(ids: list[str], holdout_percent: int) -> np.ndarray:
    """True for records in the holdout. Depends on each id only, so it is stable as data grows."""
    sha256 = hashlib.sha256
    return np.fromiter(
        (int.from_bytes(sha256(i.encode("utf-8")).digest()[:8], "big") % 100 < holdout_percent
         for i in ids),
        dtype=bool, count=len(ids),
    )


def split_dataset(data: Dataset, holdout_percent: int) -> tuple[Split, Split]:
    mask = holdout_mask(data.ids, holdout_percent)
    train_idx, hold_idx = np.flatnonzero(~mask), np.flatnonzero(mask)

    weights = data.weight_array()

    def take(idx: np.ndarray) -> Split:
        labels = data.labels[idx] if data.labels is not None else None
        return Split([data.ids[i] for i in idx], data.features[idx], labels, weights[idx])

    return take(train_idx), take(hold_idx)


def describe_skipped(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
