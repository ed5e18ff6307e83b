"""The trainer on Parquet: batch loading, bad rows, the instance's row budget, a real training."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from mledge_update.uplink import FLAGGED, NO_MODEL, SAMPLE
from trainer import columnar, synthetic
from trainer.columnar import OVER_BUDGET, load_channel, load_parquet_dataset, max_rows_for
from trainer.data import load_dataset
from trainer.entrypoint import main
from trainer.errors import DataError

from chalicelib.datasets import DATASET_COLUMNS

SCHEMA = pa.schema([("id", pa.string()), ("features", pa.list_(pa.float64())),
                    ("label", pa.int64()), ("sample_key", pa.float64())])


def write(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=7)


def row(i: int, features: list | None, label: int | None = None, key: float = 0.5) -> dict:
    return {"id": f"r{i}", "features": features, "label": label, "sample_key": key}


def test_loads_all_files_in_batches_and_counts_what_it_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(columnar, "BATCH_ROWS", 3)
    write(tmp_path / "b" / "2.parquet", [row(5, [5, 5]), row(6, [6, 6])])
    write(tmp_path / "a" / "1.parquet", [
        row(1, [1, 1]), row(2, [1]), row(3, None), row(4, [1, math.nan]),
        {"id": None, "features": [1, 1], "label": None, "sample_key": 0.1},
        {"id": "", "features": [1, 1], "label": None, "sample_key": 0.1},
        row(7, [1, None]), row(8, [1, 1e300]), row(9, [2, 2])])
    data = load_parquet_dataset(tmp_path, 2, with_labels=False, max_rows=1000)
    assert data.ids == ["r1", "r9", "r5", "r6"]
    np.testing.assert_array_equal(data.features, [[1, 1], [2, 2], [5, 5], [6, 6]])
    assert data.features.dtype == np.float32 and data.files == 2
    assert data.skipped_reasons == {"wrong feature count": 2, "missing or non-string id": 2,
                                    "non-numeric or non-finite feature": 3}


def test_labels_are_required_when_the_family_needs_them(tmp_path):
    write(tmp_path / "x.parquet", [row(1, [1, 2], 3), row(2, [1, 2])])
    data = load_parquet_dataset(tmp_path, 2, with_labels=True, max_rows=10)
    assert data.ids == ["r1"] and data.labels.tolist() == [3]
    assert data.skipped_reasons["missing or non-integer label"] == 1


def test_over_the_row_budget_a_uniform_sample_by_sample_key_is_kept(tmp_path):
    rng = np.random.default_rng(3)
    write(tmp_path / "x.parquet", [row(i, [i, i], key=float(k))
                                   for i, k in enumerate(rng.random(2000))])
    data = load_parquet_dataset(tmp_path, 2, with_labels=False, max_rows=500)
    assert 400 <= len(data) <= 500
    assert data.skipped_reasons[OVER_BUDGET] == 2000 - len(data)
    # Uniform over the file, not its first rows.
    assert data.features[:, 0].max() > 1500 and data.features[:, 0].min() < 500


def test_without_sample_keys_the_budget_takes_a_stride(tmp_path):
    schema = pa.schema([("id", pa.string()), ("features", pa.list_(pa.float64()))])
    write(tmp_path / "x.parquet", [{"id": f"r{i}", "features": [i, i]} for i in range(100)],
          schema)
    data = load_parquet_dataset(tmp_path, 2, with_labels=False, max_rows=10)
    assert [int(v) for v in data.features[:, 0]] == list(range(0, 100, 10))


def test_the_row_budget_follows_memory():
    assert max_rows_for(8, memory=8 * 2**30) == int(8 * 2**30 * 0.25) // (8 * 4 + 120)
    assert max_rows_for(4096, memory=2**20) >= 1


def test_a_channel_without_parquet_still_reads_json_lines(tmp_path):
    channel = tmp_path / "train"
    synthetic.write_channel(channel, synthetic.vibration_records(50, seed=1), per_file=10)
    via_channel = load_channel(channel, 8, with_labels=False)
    assert via_channel.ids == load_dataset(channel, 8, with_labels=False).ids


def test_a_file_that_is_not_parquet_is_fatal(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="unreadable Parquet"):
        load_parquet_dataset(tmp_path, 2, with_labels=False)


def test_a_file_without_features_is_fatal(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no column 'features'"):
        load_parquet_dataset(tmp_path, 2, with_labels=False)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(
    st.one_of(st.none(), st.text(max_size=4)),
    st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(allow_nan=True)),
                                  max_size=4)),
    st.one_of(st.none(), st.integers(-5, 5))), max_size=40),
    budget=st.integers(1, 50))
def test_any_rows_load_without_error_and_every_row_is_kept_or_counted(rows, budget, tmp_path_factory):
    channel = tmp_path_factory.mktemp("c")
    write(channel / "x.parquet", [{"id": i, "features": f, "label": label, "sample_key": 0.5}
                                  for i, f, label in rows])
    data = load_parquet_dataset(channel, 3, with_labels=True, max_rows=budget)
    assert len(data) + data.skipped == len(rows)
    assert len(data) <= budget
    assert np.isfinite(data.features).all() and data.features.shape == (len(data), 3)


def test_a_training_on_a_built_dataset_file(tmp_path):
    """The columns chalicelib.datasets writes are what the trainer reads."""
    base = tmp_path / "job"
    records = list(synthetic.vibration_records(3000, seed=2))
    table = pa.table({
        "id": [r["id"] for r in records], "thing": [r["thing"] for r in records],
        "ts": [float(r["ts"]) for r in records],
        "received_at": [int(r["received_at"]) for r in records],
        "features": [r["features"] for r in records], "label": pa.nulls(3000, pa.int64()),
        "reason": pa.nulls(3000, pa.string()), "inclusion_p": pa.nulls(3000, pa.float64()),
        "sample_key": np.linspace(0, 0.999, 3000), "sample_p": np.full(3000, 0.5),
        "dt": ["2026-01-01"] * 3000})
    assert tuple(table.column_names) == DATASET_COLUMNS
    channel = base / "input" / "data" / "train" / "datasets" / "m" / "v00001" / "data"
    channel.mkdir(parents=True)
    pq.write_table(table, channel / "part-00000.parquet")
    synthetic.write_hyperparameters(base, synthetic.kmeans_hyperparameters())
    assert main(["--base-dir", str(base)]) == 0
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    assert metrics["data"]["records"] == 3000 and metrics["data"]["files"] == 1


# Why a device sent a reading, its inclusion probability (None: an agent before the fields;
# 0 and 1.5 are outside (0, 1] and skipped), and the dataset sample's probability.
_REASONS = st.sampled_from([None, NO_MODEL, SAMPLE, FLAGGED])
_INCLUSION = st.sampled_from([None, 1.0, 0.02, 0.5, 0.0, 1.5])
_SAMPLE_P = st.sampled_from([None, 1.0, 0.25, 0.0])


def _weighted_rows(draws: list[tuple]) -> list[dict]:
    return [{"id": f"r{i}", "features": [float(i), float(i % 7)], "label": label,
             "reason": reason, "inclusion_p": inclusion, "sample_p": sample_p}
            for i, (reason, inclusion, sample_p, label) in enumerate(draws)]


def _write_both(rows: list[dict], base: Path) -> tuple[Path, Path]:
    """The same records as a Parquet dataset and as a JSON-lines channel, with one verdict
    file beside each (as the train manifests of both kinds of snapshot put it)."""
    as_json, as_parquet = base / "json", base / "parquet"
    for channel in (as_json, as_parquet):
        (channel / "labels").mkdir(parents=True)
        with gzip.open(channel / "labels" / "20260101T000000000000-label.jsonl.gz", "wt") as fh:
            for verdict_of, verdict in (("r1", "fault"), ("r2", "normal"), ("r1", "normal"),
                                        ("r3", "fault"), ("", "fault")):
                fh.write(json.dumps({"verdict_of": verdict_of, "verdict": verdict}) + "\n")
    (as_json / "raw").mkdir()
    with gzip.open(as_json / "raw" / "a.jsonl.gz", "wt") as fh:
        for r in rows:
            # Raw records omit what they lack; they have no dataset sample (sample_p).
            fh.write(json.dumps({k: v for k, v in r.items()
                                 if v is not None and k != "sample_p"}) + "\n")
    schema = pa.schema([("id", pa.string()), ("features", pa.list_(pa.float64())),
                        ("label", pa.int64()), ("reason", pa.string()),
                        ("inclusion_p", pa.float64()), ("sample_p", pa.float64())])
    write(as_parquet / "data" / "part-0.parquet", rows, schema)
    return as_json, as_parquet


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draws=st.lists(st.tuples(_REASONS, _INCLUSION, st.sampled_from([None, 1.0]),
                                st.one_of(st.none(), st.integers(0, 3))),
                      min_size=1, max_size=30),
       with_labels=st.booleans())
def test_a_parquet_dataset_weighs_flags_and_judges_like_the_json_lines_channel(
        draws, with_labels, tmp_path_factory):
    """sample_p 1 or missing: exactly the JSON-lines loader's weights (1 / inclusion_p),
    flags, labels, verdicts and skipped reasons."""
    as_json, as_parquet = _write_both(_weighted_rows(draws), tmp_path_factory.mktemp("c"))
    expected = load_dataset(as_json, 2, with_labels=with_labels)
    got = load_channel(as_parquet, 2, with_labels=with_labels)
    assert got.ids == expected.ids
    np.testing.assert_array_equal(got.features, expected.features)
    np.testing.assert_array_equal(got.weight_array(), expected.weight_array())
    np.testing.assert_array_equal(got.flagged_array(), expected.flagged_array())
    if with_labels:
        np.testing.assert_array_equal(got.labels, expected.labels)
    assert got.verdicts == expected.verdicts == {"r1": "normal", "r2": "normal", "r3": "fault"}
    assert got.skipped_reasons == expected.skipped_reasons


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draws=st.lists(st.tuples(_REASONS, _INCLUSION, _SAMPLE_P, st.just(None)),
                      min_size=1, max_size=30))
def test_a_parquet_row_weighs_one_over_inclusion_p_times_sample_p(draws, tmp_path_factory):
    rows = _weighted_rows(draws)
    as_json, as_parquet = _write_both(rows, tmp_path_factory.mktemp("c"))
    expected = load_dataset(as_json, 2, with_labels=False)
    got = load_channel(as_parquet, 2, with_labels=False)
    sample_p = {r["id"]: r["sample_p"] for r in rows}
    bad_sample = {rid for rid, p in sample_p.items() if p is not None and not 0 < p <= 1}
    assert got.ids == [rid for rid in expected.ids if rid not in bad_sample]
    keep = np.array([rid not in bad_sample for rid in expected.ids], dtype=bool)
    divisor = np.array([sample_p[rid] or 1.0 for rid in got.ids])
    np.testing.assert_allclose(got.weight_array(), expected.weight_array()[keep] / divisor,
                               rtol=1e-12)
    assert got.skipped_reasons.get(columnar.BAD_SAMPLE_P, 0) == len(bad_sample & set(expected.ids))


def test_a_parquet_dataset_without_the_probability_columns_weighs_every_row_1(tmp_path):
    write(tmp_path / "x.parquet", [row(1, [1, 2]), row(2, [3, 4])])
    data = load_channel(tmp_path, 2, with_labels=False)
    np.testing.assert_array_equal(data.weight_array(), [1.0, 1.0])
    assert not data.flagged_array().any() and data.verdicts == {}
