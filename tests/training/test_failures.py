"""Failure paths of the training entrypoint: each writes output/failure and exits non-zero."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from mledge_update.families import FAMILIES, FAMILY_METRICS
from threadpoolctl import threadpool_limits
from trainer import synthetic
from trainer.entrypoint import main
from trainer.errors import UnknownFamilyError
from trainer.families import family_class, family_names, get_family

EXIT_HYPERPARAMETERS, EXIT_DATA, EXIT_CHAMPION = 3, 4, 5

@pytest.fixture(scope="module", autouse=True)
def one_thread_per_library():
    """The shared 2-core test box is oversubscribed; OpenMP/BLAS spin-waiting there makes
    k-means many times slower with 2 threads than with 1. Results do not depend on it."""
    with threadpool_limits(limits=1):
        yield


def setup(base: Path, hyperparameters: dict[str, Any],
          records: list[dict[str, Any]] | None = None) -> Path:
    if records is not None:
        synthetic.write_channel(base / "input" / "data" / "train", records, per_file=200)
    synthetic.write_hyperparameters(base, hyperparameters)
    return base


def fails(base: Path, exit_code: int, *fragments: str) -> str:
    code = main(["--base-dir", str(base)])
    reason = (base / "output" / "failure").read_text()
    assert code == exit_code, reason
    assert reason.endswith("\n") and "\n" not in reason[:-1]
    for fragment in fragments:
        assert fragment in reason
    assert not (base / "model" / "model.onnx").exists()
    return reason


@pytest.fixture(scope="module")
def vibration() -> list[dict[str, Any]]:
    return list(synthetic.vibration_records(300, seed=1))


@pytest.mark.parametrize("overrides, fragments", [
    ({"k_max": "eight"}, ["'k_max'", "whole number", "'eight'"]),
    ({"k_min": "5", "k_max": "3"}, ["'k_max'", ">= k_min"]),
    ({"k_min": "1"}, ["'k_min'", ">= 2"]),
    ({"anomaly_quantile": "1.5"}, ["'anomaly_quantile'", "less than 1"]),
    ({"anomaly_quantile": "nan"}, ["'anomaly_quantile'", "finite"]),
    ({"holdout_percent": "0"}, ["'holdout_percent'", ">= 1"]),
    ({"features": "rms,peak"}, ["'features'", "JSON list"]),
    ({"features": '["rms", "rms"]'}, ["'features'", "unique"]),
    ({"model_name": "Vibration Anomaly"}, ["'model_name'"]),
    ({"model_version": "-1"}, ["'model_version'", ">= 0"]),
    ({"metric": "accuracy"}, ["'metric'", "silhouette", "'accuracy'"]),
    ({"label_mode": "sometimes"}, ["'label_mode'"]),
    ({"k_mx": "8"}, ["unknown hyperparameter", "k_mx", "known:"]),
])
def test_bad_kmeans_hyperparameters(tmp_path: Path, vibration, overrides, fragments):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(**overrides), vibration)
    fails(base, EXIT_HYPERPARAMETERS, *fragments)


@pytest.mark.parametrize("overrides, fragments", [
    ({"hidden_layer_sizes": "64,x"}, ["'hidden_layer_sizes'", "'x'"]),
    ({"hidden_layer_sizes": "0"}, ["'hidden_layer_sizes'", ">= 1"]),
    ({"estimator": "forest"}, ["'estimator'", "mlp, logistic"]),
    ({"max_iter": "0"}, ["'max_iter'"]),
    ({"label_mode": "none"}, ["'label_mode'", "needs labels"]),
])
def test_bad_classifier_hyperparameters(tmp_path: Path, overrides, fragments):
    base = setup(tmp_path, synthetic.classifier_hyperparameters(**overrides),
                 list(synthetic.digits_records(50)))
    fails(base, EXIT_HYPERPARAMETERS, *fragments)


def test_missing_required_hyperparameter(tmp_path: Path, vibration):
    values = synthetic.kmeans_hyperparameters()
    del values["features"]
    fails(setup(tmp_path, values, vibration), EXIT_HYPERPARAMETERS, "'features' is required")


def test_unknown_family(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(family="random_forest"), vibration)
    fails(base, EXIT_HYPERPARAMETERS, "unknown family 'random_forest'", "classifier",
          "kmeans_anomaly")


def test_missing_and_malformed_hyperparameters_file(tmp_path: Path):
    fails(tmp_path, EXIT_HYPERPARAMETERS, "hyperparameters file not found")
    path = tmp_path / "input" / "config" / "hyperparameters.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    fails(tmp_path, EXIT_HYPERPARAMETERS, "not valid JSON")
    path.write_text('["family"]')
    fails(tmp_path, EXIT_HYPERPARAMETERS, "JSON object")


def test_missing_train_channel(tmp_path: Path):
    fails(setup(tmp_path, synthetic.kmeans_hyperparameters()), EXIT_DATA,
          "train channel not found")


def test_empty_train_channel(tmp_path: Path):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters())
    (base / "input" / "data" / "train" / "raw").mkdir(parents=True)
    (base / "input" / "data" / "train" / "notes.txt").write_text("not data")
    fails(base, EXIT_DATA, "holds no *.jsonl.gz files")


def test_corrupt_gzip(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(), vibration)
    bad = base / "input" / "data" / "train" / "raw" / "late" / "broken.jsonl.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(gzip.compress(b'{"id": "x"}\n' * 100)[:-30])
    fails(base, EXIT_DATA, "corrupt gzip file", "broken.jsonl.gz")


def test_not_gzip_at_all(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(), vibration)
    (base / "input" / "data" / "train" / "plain.jsonl.gz").write_text('{"id": "x"}\n')
    fails(base, EXIT_DATA, "corrupt gzip file", "plain.jsonl.gz")


def test_too_few_usable_records(tmp_path: Path, vibration):
    bad = [{**r, "id": f"bad-{i}", "features": r["features"][:3]}
           for i, r in enumerate(vibration[:50])]
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(), vibration[:5] + bad)
    fails(base, EXIT_DATA, "too little data", "5 usable records", "50 wrong feature count")


def test_fewer_records_than_k_max(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(k_min="2", k_max="40"),
                 vibration[:40])
    fails(base, EXIT_DATA, "too little data", "k_max=40")


def test_single_class(tmp_path: Path):
    records = [{**r, "label": 3} for r in synthetic.digits_records(60)]
    base = setup(tmp_path, synthetic.classifier_hyperparameters(), records)
    fails(base, EXIT_DATA, "1 class(es)", "at least 2")


def test_unlabelled_records_are_unusable_for_a_classifier(tmp_path: Path):
    records = [{k: v for k, v in r.items() if k != "label"} for r in synthetic.digits_records(60)]
    base = setup(tmp_path, synthetic.classifier_hyperparameters(), records)
    fails(base, EXIT_DATA, "0 usable records", "60 missing or non-integer label")


def test_unloadable_champion(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(k_max="4"), vibration)
    champion = base / "input" / "data" / "champion" / "model.onnx"
    champion.parent.mkdir(parents=True)
    champion.write_bytes(b"not an onnx model")
    fails(base, EXIT_CHAMPION, "champion model.onnx cannot be loaded")


def test_champion_with_another_feature_count(tmp_path: Path, vibration):
    narrow = synthetic.kmeans_hyperparameters(k_max="4", features=json.dumps(["rms", "peak"]))
    old = setup(tmp_path / "old", narrow,
                [{**r, "features": r["features"][:2]} for r in vibration])
    assert main(["--base-dir", str(old)]) == 0
    base = setup(tmp_path / "new", synthetic.kmeans_hyperparameters(k_max="4"), vibration)
    champion = base / "input" / "data" / "champion" / "model.onnx"
    champion.parent.mkdir(parents=True)
    champion.write_bytes((old / "model" / "model.onnx").read_bytes())
    fails(base, EXIT_CHAMPION, "champion ONNX takes 2 features, the schema has 8")


def test_success_clears_an_old_failure_file(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(k_max="3"), vibration)
    (base / "output").mkdir()
    (base / "output" / "failure").write_text("an earlier run failed\n")
    assert main(["--base-dir", str(base)]) == 0
    assert not (base / "output" / "failure").exists()


def test_failure_removes_outputs_of_an_earlier_run(tmp_path: Path, vibration):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(k_max="3"), vibration)
    assert main(["--base-dir", str(base)]) == 0
    synthetic.write_hyperparameters(base, synthetic.kmeans_hyperparameters(k_max="three"))
    fails(base, EXIT_HYPERPARAMETERS, "'k_max'")
    assert not list((base / "model").iterdir())


def test_unexpected_error_is_reported_as_internal(tmp_path: Path, vibration, monkeypatch):
    base = setup(tmp_path, synthetic.kmeans_hyperparameters(k_max="3"), vibration)
    family = type(get_family("kmeans_anomaly"))

    def broken_fit(self, params, common, train, champion_model=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(family, "fit", broken_fit)
    fails(base, 70, "internal error: RuntimeError: disk on fire")


def test_registry_lists_the_families():
    assert family_names() == ("classifier", "cnn", "kmeans_anomaly")
    assert get_family("classifier").metrics == ("accuracy", "macro_f1")


def test_every_contract_family_has_a_trainer_with_the_contract_metrics():
    for name in FAMILIES:
        family = family_class(name)
        assert family.name == name
        assert family.metrics == FAMILY_METRICS[name]


def test_a_family_the_contract_does_not_list_is_unknown():
    for name in ("base", "__init__", "nope", ""):
        with pytest.raises(UnknownFamilyError, match="unknown family"):
            get_family(name)
