from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path

import pytest

from chalicelib.config import (
    ConfigError,
    UnknownModelError,
    load_pipeline_config,
    parse_pipeline_config,
)
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG

RAW = tomllib.loads(DEFAULT_PIPELINE_CONFIG.read_text())


def test_shipped_config_defines_both_example_models() -> None:
    config = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)
    vib = config.model("vibration-anomaly")
    assert vib.family == "kmeans_anomaly"
    assert vib.schema.feature_count == 8
    assert vib.schema.label == "none"
    digits = config.model("digits")
    assert digits.family == "cnn"
    assert digits.training.gpu_count == 1
    assert digits.schema.feature_count == 64
    assert digits.schema.features[0] == "px0"
    assert digits.schema.label_values == tuple(range(10))
    assert digits.training.backend == "batch"
    # hyperparameters reach the training container as strings
    assert all(isinstance(v, str) for v in vib.hyperparameters.values())


def test_unknown_model_lists_the_known_ones() -> None:
    config = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'.*digits"):
        config.model("nope")


def _with(path: list[str], value: object) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["models", "digits", "threshold"], "high", r"models\.digits\.threshold: must be a number"),
        (["models", "digits", "family"], "svm", r"models\.digits\.family: must be one of"),
        (["models", "digits", "metric"], "silhouette", r"models\.digits\.metric: must be one of"),
        (["models", "digits", "thing_group"], None, r"models\.digits\.thing_group: is required"),
        (["models", "digits", "treshold"], 0.5, r"models\.digits\.treshold: is not a known field"),
        (["models", "digits", "training", "backend"], "ec2",
         r"models\.digits\.training\.backend: must be one of"),
        (["models", "vibration-anomaly", "training", "instance_type"], "m5.large",
         r"models\.vibration-anomaly\.training\.instance_type: SageMaker"),
        (["models", "digits", "schema", "features"], [], r"models\.digits\.schema\.features"),
        (["models", "digits", "schema", "features"], ["a", "a"],
         r"models\.digits\.schema\.features: names must be unique"),
        (["models", "digits", "rollout", "increment_factor"], 9.0,
         r"models\.digits\.rollout\.increment_factor: must be at most 5"),
        (["models", "digits", "uplink", "sample_rate"], 2.0,
         r"models\.digits\.uplink\.sample_rate: must be at most 1"),
        (["models", "digits", "min_new_records"], 0, r"models\.digits\.min_new_records"),
        (["models", "digits", "schema", "min_value"], 20.0, r"models\.digits\.schema\.max_value: must be greater"),
        (["models", "vibration-anomaly", "training", "instance_type"], "ml.g5.xlarge",
         r"models\.vibration-anomaly\.training\.instance_type: ml\.g5\.xlarge is a GPU "
         r"instance: the kmeans_anomaly family never uses a GPU"),
        (["models", "vibration-anomaly", "training", "gpu_count"], 1,
         r"models\.vibration-anomaly\.training\.gpu_count: must be 0: the kmeans_anomaly"),
    ],
)
def test_errors_name_file_model_and_field(path: list[str], value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^my\.toml: " + message):
        parse_pipeline_config(_with(path, value), file="my.toml")


def test_bad_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.x\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_pipeline_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.toml: pipeline config file not found"):
        load_pipeline_config(tmp_path / "missing.toml")


def test_schema_document_omits_infinite_bounds() -> None:
    raw = _with(["models", "vibration-anomaly", "schema", "min_value"], None)
    schema = parse_pipeline_config(raw).model("vibration-anomaly").schema
    assert schema.min_value == -math.inf
    assert "min_value" not in schema.to_document()
    assert schema.to_document()["max_value"] == 1e6
