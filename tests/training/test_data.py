"""Loading the train channel and parsing hyperparameters (units below the entrypoint)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from trainer import synthetic
from trainer.data import load_dataset, split_dataset
from trainer.errors import HyperparameterError
from trainer.hyperparameters import Hyperparameters
from trainer.onnx_export import parity
from trainer.paths import TrainingPaths


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def rec(i: int, features: object, **extra: object) -> str:
    return json.dumps({"id": f"t-{i}", "features": features, **extra})


def test_loads_recursively_in_path_order_and_counts_skipped(tmp_path: Path):
    write_lines(tmp_path / "b" / "deep" / "2.jsonl.gz", [rec(3, [3, 3]), rec(4, [4.5, 4])])
    write_lines(tmp_path / "a" / "1.jsonl.gz", [
        rec(1, [1.0, 1.0]),
        rec(2, [1.0]),                      # wrong feature count
        rec(5, [1.0, "2"]),                 # a string
        rec(6, [1.0, None]),                # null
        rec(7, [1.0, float("nan")]),        # NaN (json.dumps writes NaN)
        rec(8, [1.0, 1e300]),               # overflows float32
        json.dumps({"features": [1, 2]}),   # no id
        json.dumps([1, 2]),                 # not an object
        "{broken json",
        "",
    ])
    (tmp_path / "ignored.json").write_text("{}")
    data = load_dataset(tmp_path, 2, with_labels=False)
    assert data.ids == ["t-1", "t-3", "t-4"]
    assert data.features.dtype == np.float32
    np.testing.assert_array_equal(data.features, [[1, 1], [3, 3], [4.5, 4]])
    assert data.labels is None and data.files == 2
    assert data.skipped == 8
    assert data.skipped_reasons == {
        "wrong feature count": 1, "non-numeric or non-finite feature": 4,
        "missing or non-string id": 1, "not a JSON object": 1, "line is not valid JSON": 1,
    }


def test_labels_kept_when_needed(tmp_path: Path):
    write_lines(tmp_path / "x.jsonl.gz", [rec(1, [1, 2], label=3), rec(2, [1, 2]),
                                          rec(3, [1, 2], label="4"), rec(4, [1, 2], label=True)])
    data = load_dataset(tmp_path, 2, with_labels=True)
    assert data.ids == ["t-1"] and data.labels.tolist() == [3]
    assert data.skipped_reasons == {"missing or non-integer label": 3}


def test_a_label_outside_int64_is_skipped_not_fatal(tmp_path: Path):
    write_lines(tmp_path / "x.jsonl.gz", [rec(1, [1, 2], label=3), rec(2, [1, 2], label=2**63),
                                          rec(3, [1, 2], label=-(10**30))])
    data = load_dataset(tmp_path, 2, with_labels=True)
    assert data.ids == ["t-1"] and data.labels.tolist() == [3]
    assert data.skipped_reasons == {"label outside the int64 range": 2}


def test_chunked_conversion_matches_single_chunk(tmp_path: Path, monkeypatch):
    records = list(synthetic.vibration_records(700, seed=2))
    synthetic.write_channel(tmp_path, records, per_file=90)
    whole = load_dataset(tmp_path, 8, with_labels=False)
    monkeypatch.setattr("trainer.data.CHUNK_ROWS", 50)
    chunked = load_dataset(tmp_path, 8, with_labels=False)
    assert chunked.ids == whole.ids == [r["id"] for r in records]
    np.testing.assert_array_equal(chunked.features, whole.features)


def test_split_is_a_partition(tmp_path: Path):
    synthetic.write_channel(tmp_path, synthetic.digits_records(300), per_file=100)
    data = load_dataset(tmp_path, 64, with_labels=True)
    train, holdout = split_dataset(data, 25)
    assert sorted(train.ids + holdout.ids) == sorted(data.ids)
    assert not set(train.ids) & set(holdout.ids)
    assert len(train.labels) == len(train) and len(holdout.labels) == len(holdout)


def test_paths_honour_argument_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("MLEDGE_TRAINING_BASE_DIR", raising=False)
    assert TrainingPaths.resolve().base == Path("/opt/ml")
    monkeypatch.setenv("MLEDGE_TRAINING_BASE_DIR", "/tmp/env-base")
    assert TrainingPaths.resolve().base == Path("/tmp/env-base")
    paths = TrainingPaths.resolve("/tmp/arg-base")
    assert paths.hyperparameters_file == Path("/tmp/arg-base/input/config/hyperparameters.json")
    assert paths.train_channel == Path("/tmp/arg-base/input/data/train")
    assert paths.champion_model == Path("/tmp/arg-base/input/data/champion/model.onnx")
    assert paths.failure_file == Path("/tmp/arg-base/output/failure")
    assert paths.metrics_file == Path("/tmp/arg-base/model/metrics.json")


def test_hyperparameters_parse_sagemaker_strings():
    hp = Hyperparameters({"estimator": '"mlp"', "k": "8", "q": "0.5", "sizes": "128, 64",
                          "flag": "true", "whole": "8.0", "n": 3, "json_sizes": "[32,16]"})
    assert hp.string("estimator", choices=("mlp",)) == "mlp"
    assert hp.integer("k", minimum=2) == 8
    assert hp.integer("whole") == 8
    assert hp.integer("n") == 3
    assert hp.number("q", minimum=0, maximum=1) == 0.5
    assert hp.int_tuple("sizes") == (128, 64)
    assert hp.int_tuple("json_sizes") == (32, 16)
    assert hp.boolean("flag") is True
    assert hp.string("absent", "default") == "default"
    hp.check_all_read("test")


@pytest.mark.parametrize("raw, call, message", [
    ({"k": "8.5"}, lambda hp: hp.integer("k"), "whole number"),
    ({"k": "1"}, lambda hp: hp.integer("k", minimum=2), ">= 2"),
    ({"q": "inf"}, lambda hp: hp.number("q"), "finite"),
    ({"flag": "maybe"}, lambda hp: hp.boolean("flag"), "true or false"),
    ({"k": ""}, lambda hp: hp.integer("k"), "is required"),
    ({"k": ["8"]}, lambda hp: hp.integer("k"), "must be a string"),
])
def test_hyperparameter_errors_name_the_key(raw, call, message):
    with pytest.raises(HyperparameterError, match=message) as info:
        call(Hyperparameters(raw))
    assert repr(next(iter(raw))) in str(info.value)


def test_sagemaker_keys_are_not_unknown():
    hp = Hyperparameters({"sagemaker_program": "x", "typo": "1"})
    with pytest.raises(HyperparameterError, match="typo"):
        hp.check_all_read("test")


def test_parity_rule():
    labels, scores = np.array([0, 1, 1]), np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])
    ok = parity((labels, scores), (labels.copy(), scores + 5e-4))
    assert ok.passed and ok.rows == 3 and ok.label_agreement == 1.0
    assert not parity((labels, scores), (labels, scores + 2e-3)).passed
    assert not parity((labels, scores), (np.array([0, 1, 0]), scores)).passed
    assert not parity((labels, scores), (labels, scores[:, :1])).passed


def test_duplicate_record_ids_across_raw_objects_count_once(tmp_path: Path):
    # An SQS redelivery inside another batch stores a record in two raw objects.
    write_lines(tmp_path / "a.jsonl.gz", [rec(1, [1.0, 1.0]), rec(2, [2.0, 2.0])])
    write_lines(tmp_path / "b.jsonl.gz", [rec(2, [9.0, 9.0]), rec(3, [3.0, 3.0])])
    data = load_dataset(tmp_path, 2, with_labels=False)
    assert data.ids == ["t-1", "t-2", "t-3"]
    assert data.features[1].tolist() == [2.0, 2.0]  # the first copy wins
    assert data.skipped_reasons == {"duplicate id": 1}
