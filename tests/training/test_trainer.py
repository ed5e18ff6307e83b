"""The training entrypoint end to end: both families, champion scoring, ONNX conventions."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from threadpoolctl import threadpool_limits
from trainer import synthetic
from trainer.data import holdout_bucket, holdout_mask
from trainer.entrypoint import main
from trainer.onnx_export import PARITY_MAX_ABS_DIFF, TARGET_OPSET

from tests.conftest import subprocess_env

METRICS_KEYS = {"family", "metric", "challenger", "champion", "parity", "detection", "data", "model", "onnx"}

@pytest.fixture(scope="module", autouse=True)
def one_thread_per_library():
    """The shared 2-core test box is oversubscribed; OpenMP/BLAS spin-waiting there makes
    k-means many times slower with 2 threads than with 1. Results do not depend on it."""
    with threadpool_limits(limits=1):
        yield


def make_run(base: Path, records: list[dict[str, Any]], hyperparameters: dict[str, Any],
             *, per_file: int = 250) -> Path:
    synthetic.write_channel(base / "input" / "data" / "train", records, per_file=per_file)
    synthetic.write_hyperparameters(base, hyperparameters)
    return base


def train_ok(base: Path) -> dict[str, Any]:
    code = main(["--base-dir", str(base)])
    failure = base / "output" / "failure"
    assert code == 0, failure.read_text() if failure.exists() else "no failure file"
    assert not failure.exists()
    return json.loads((base / "model" / "metrics.json").read_text())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, features: Any) -> tuple[np.ndarray, np.ndarray]:
    label, scores = session(path).run(["label", "scores"],
                                      {"input": np.asarray(features, dtype=np.float32)})
    return label, scores


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def vibration_records() -> list[dict[str, Any]]:
    # 1500 normal readings from 4 operating modes plus ~0.5 % far-off outliers.
    return list(synthetic.vibration_records(1500, seed=3, outlier_fraction=0.005))


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory, vibration_records) -> Path:
    base = make_run(tmp_path_factory.mktemp("kmeans"), vibration_records,
                    synthetic.kmeans_hyperparameters(k_min="2", k_max="6"))
    train_ok(base)
    return base


@pytest.fixture(scope="module")
def digits_records() -> list[dict[str, Any]]:
    return list(synthetic.digits_records(1797))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, digits_records) -> Path:
    base = make_run(tmp_path_factory.mktemp("digits"), digits_records,
                    synthetic.classifier_hyperparameters(hidden_layer_sizes="32", max_iter="200"))
    train_ok(base)
    return base


def test_kmeans_metrics_have_the_contract_shape(kmeans_run: Path):
    metrics = json.loads((kmeans_run / "model" / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["family"] == "kmeans_anomaly" and metrics["metric"] == "silhouette"
    assert metrics["champion"] is None
    assert set(metrics["challenger"]) == {"silhouette"}
    assert metrics["challenger"]["silhouette"] > 0.5  # well-separated blobs
    assert metrics["parity"]["passed"] is True
    assert metrics["parity"]["label_agreement"] == 1.0
    assert metrics["parity"]["max_abs_diff"] <= PARITY_MAX_ABS_DIFF
    data = metrics["data"]
    assert data["records"] == 1500 and data["skipped_records"] == 0 and data["files"] == 6
    assert data["train"] + data["holdout"] == 1500
    assert metrics["parity"]["rows"] == data["holdout"]
    assert 2 <= metrics["model"]["k"] <= 6
    model_bytes = (kmeans_run / "model" / "model.onnx").read_bytes()
    assert metrics["onnx"] == {"sha256": hashlib.sha256(model_bytes).hexdigest(),
                               "size": len(model_bytes)}


def test_kmeans_picks_the_number_of_operating_modes(kmeans_run: Path):
    metrics = json.loads((kmeans_run / "model" / "metrics.json").read_text())
    assert metrics["model"]["k"] == 4
    assert set(metrics["model"]["k_scores"]) == {"2", "3", "4", "5", "6"}


def test_kmeans_threshold_flags_outliers_and_spares_normal_readings(kmeans_run: Path):
    model = kmeans_run / "model" / "model.onnx"
    threshold = float(metadata(model)["mledge.anomaly_threshold"])
    metrics = json.loads((kmeans_run / "model" / "metrics.json").read_text())
    assert threshold == pytest.approx(metrics["model"]["anomaly_threshold"])
    # Fresh readings of the same operating modes (same seed: same modes), none of them outliers.
    fresh = [r["features"] for r in synthetic.vibration_records(2500, seed=3)][1500:]
    rng = np.random.default_rng(11)
    outliers = [synthetic.vibration_outlier(rng) for _ in range(50)]
    _, normal_scores = run_onnx(model, fresh)
    _, outlier_scores = run_onnx(model, outliers)
    assert np.all(outlier_scores.min(axis=1) > threshold)
    assert np.mean(normal_scores.min(axis=1) > threshold) < 0.03


def test_classifier_learns_digits(classifier_run: Path):
    metrics = json.loads((classifier_run / "model" / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["family"] == "classifier" and metrics["metric"] == "accuracy"
    assert set(metrics["challenger"]) == {"accuracy", "macro_f1"}
    assert metrics["challenger"]["accuracy"] > 0.9
    assert metrics["challenger"]["macro_f1"] > 0.9
    assert metrics["parity"]["passed"] is True
    assert metrics["model"]["classes"] == list(range(10))
    assert metrics["model"]["hidden_layer_sizes"] == [32]
    assert metadata(classifier_run / "model" / "model.onnx")["mledge.classes"] == json.dumps(
        list(range(10)))


def test_logistic_estimator(tmp_path: Path, digits_records):
    base = make_run(tmp_path, digits_records[:600],
                    synthetic.classifier_hyperparameters(estimator="logistic", max_iter="500",
                                                         metric="macro_f1"))
    metrics = train_ok(base)
    assert metrics["metric"] == "macro_f1"
    assert metrics["model"]["estimator"] == "logistic"
    assert metrics["challenger"]["accuracy"] > 0.85
    assert metrics["parity"]["passed"] is True


@pytest.mark.parametrize("run_fixture, family, n_features, k", [
    ("kmeans_run", "kmeans_anomaly", 8, None),
    ("classifier_run", "classifier", 64, 10),
])
def test_onnx_conventions(request, run_fixture: str, family: str, n_features: int,
                          k: int | None):
    base: Path = request.getfixturevalue(run_fixture)
    path = base / "model" / "model.onnx"
    sess = session(path)
    [inp] = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", n_features)
    outputs = {o.name: o for o in sess.get_outputs()}
    assert list(outputs) == ["label", "scores"]
    assert outputs["label"].type == "tensor(int64)"
    assert outputs["scores"].type == "tensor(float)"
    meta = metadata(path)
    assert meta["mledge.family"] == family
    assert meta["mledge.version"] == "1"
    assert meta["mledge.model"] == ("vibration-anomaly" if family == "kmeans_anomaly"
                                    else "digits")
    assert len(json.loads(meta["mledge.features"])) == n_features
    if family == "kmeans_anomaly":
        assert float(meta["mledge.anomaly_threshold"]) > 0
    model = onnx.load(str(path))
    names = [t.name for t in model.graph.initializer]
    assert names == sorted(names)
    for opset in model.opset_import:
        assert opset.version <= TARGET_OPSET[opset.domain]
    # The metrics' k (clusters) or class count is the scores width.
    metrics = json.loads((base / "model" / "metrics.json").read_text())
    width = k or metrics["model"]["k"]
    label, scores = run_onnx(path, np.zeros((3, n_features)))
    assert label.dtype == np.int64 and label.shape == (3,)
    assert scores.dtype == np.float32 and scores.shape == (3, width)


@pytest.mark.parametrize("run_fixture", ["kmeans_run", "classifier_run"])
def test_golden_rows_reproduce_with_onnxruntime(request, run_fixture: str):
    base: Path = request.getfixturevalue(run_fixture)
    golden = json.loads((base / "model" / "golden.json").read_text())
    assert set(golden) == {"input_name", "inputs", "outputs", "tolerance"}
    assert golden["input_name"] == "input" and len(golden["inputs"]) == 8
    label, scores = run_onnx(base / "model" / "model.onnx", golden["inputs"])
    assert label.tolist() == golden["outputs"]["label"]
    np.testing.assert_allclose(scores, golden["outputs"]["scores"], atol=golden["tolerance"])


def test_golden_rows_come_from_the_holdout(classifier_run: Path, digits_records):
    golden = json.loads((classifier_run / "model" / "golden.json").read_text())
    holdout = [r["features"] for r in digits_records if holdout_bucket(r["id"]) < 20]
    assert golden["inputs"] == holdout[:8]


def test_champion_identical_to_challenger_scores_identically(tmp_path: Path, kmeans_run: Path,
                                                              vibration_records):
    """Same data, same seed: the challenger equals the champion, so their metrics must too."""
    base = make_run(tmp_path, vibration_records,
                    synthetic.kmeans_hyperparameters(k_min="2", k_max="6", model_version="2"))
    champion_dir = base / "input" / "data" / "champion"
    champion_dir.mkdir(parents=True)
    shutil.copy(kmeans_run / "model" / "model.onnx", champion_dir / "model.onnx")
    metrics = train_ok(base)
    assert metrics["champion"] == metrics["challenger"]


def test_champion_scored_on_the_same_holdout(tmp_path: Path, digits_records):
    # Champion: a logistic model trained on less data. Challenger: an MLP on all of it.
    old = make_run(tmp_path / "v1", digits_records[:400],
                   synthetic.classifier_hyperparameters(estimator="logistic", max_iter="300"))
    train_ok(old)
    champion_model = old / "model" / "model.onnx"
    new = make_run(tmp_path / "v2", digits_records,
                   synthetic.classifier_hyperparameters(hidden_layer_sizes="32", max_iter="200",
                                                        model_version="2"))
    (new / "input" / "data" / "champion").mkdir(parents=True)
    shutil.copy(champion_model, new / "input" / "data" / "champion" / "model.onnx")
    metrics = train_ok(new)
    # Independently: the holdout is every record whose id hashes below 20 of 100.
    holdout = [r for r in digits_records if holdout_bucket(r["id"]) < 20]
    assert metrics["data"]["holdout"] == len(holdout)
    label, _ = run_onnx(champion_model, [r["features"] for r in holdout])
    expected_accuracy = float(np.mean(label == np.array([r["label"] for r in holdout])))
    assert metrics["champion"]["accuracy"] == pytest.approx(expected_accuracy)
    assert set(metrics["champion"]) == {"accuracy", "macro_f1"}


def test_holdout_is_stable_as_data_grows():
    first = [f"thing-{i % 7}-{i}" for i in range(5000)]
    grown = first + [f"thing-{i % 7}-{i}" for i in range(5000, 12000)]
    mask_first, mask_grown = holdout_mask(first, 20), holdout_mask(grown, 20)
    assert np.array_equal(mask_grown[:5000], mask_first)
    assert 0.18 < mask_grown.mean() < 0.22
    # Order does not matter either: the bucket depends on the id alone.
    shuffled = list(reversed(grown))
    assert np.array_equal(holdout_mask(shuffled, 20)[::-1], mask_grown)


def test_holdout_bucket_is_sha256_of_the_id():
    for record_id in ("a", "thing-001-17", "ünïcode"):
        digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()
        assert holdout_bucket(record_id) == int(digest[:16], 16) % 100


def test_holdout_is_stable_through_training(tmp_path: Path, vibration_records):
    """Training on grown data keeps every earlier holdout record in the holdout."""
    hp = synthetic.kmeans_hyperparameters(k_min="4", k_max="4")
    small = train_ok(make_run(tmp_path / "small", vibration_records[:1000], hp))
    grown = train_ok(make_run(tmp_path / "grown", vibration_records, hp))
    expected_small = sum(holdout_bucket(r["id"]) < 20 for r in vibration_records[:1000])
    expected_grown = sum(holdout_bucket(r["id"]) < 20 for r in vibration_records)
    assert small["data"]["holdout"] == expected_small
    assert grown["data"]["holdout"] == expected_grown


def test_exports_are_deterministic_and_keep_initializer_names(tmp_path: Path, vibration_records):
    hp = synthetic.kmeans_hyperparameters(k_min="4", k_max="4")
    a = make_run(tmp_path / "a", vibration_records[:1200], hp)
    b = make_run(tmp_path / "b", vibration_records[:1200], hp)
    c = make_run(tmp_path / "c", vibration_records, hp)
    for base in (a, b, c):
        train_ok(base)
    model_a, model_b, model_c = (base / "model" / "model.onnx" for base in (a, b, c))
    assert model_a.read_bytes() == model_b.read_bytes()
    names = [[t.name for t in onnx.load(str(p)).graph.initializer] for p in (model_a, model_c)]
    assert names[0] == names[1]
    assert model_a.read_bytes() != model_c.read_bytes()


def test_entrypoint_as_a_subprocess(tmp_path: Path, vibration_records):
    base = make_run(tmp_path / "ok", vibration_records[:400],
                    synthetic.kmeans_hyperparameters(k_min="2", k_max="4"))
    done = subprocess.run([sys.executable, "-m", "trainer.entrypoint", "train",
                           "--base-dir", str(base)],
                          env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[trainer] wrote" in done.stdout
    for name in ("model.onnx", "metrics.json", "golden.json"):
        assert (base / "model" / name).is_file()


def test_subprocess_base_dir_from_environment_and_failure(tmp_path: Path):
    base = tmp_path / "bad"
    synthetic.write_hyperparameters(base, synthetic.kmeans_hyperparameters(family="forest"))
    done = subprocess.run([sys.executable, "-m", "trainer.entrypoint"],
                          env=subprocess_env(MLEDGE_TRAINING_BASE_DIR=str(base), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    reason = (base / "output" / "failure").read_text()
    assert "unknown family 'forest'" in reason
    assert "FAILED" in done.stderr
