"""Local inference: ONNX conventions, smoke rows, and hot swaps under concurrent predictions."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from mledge_edge.config import AgentConfig, ConfigError, config_from_args
from mledge_edge.model import (
    LoadedModel,
    ModelHandle,
    ModelLoadError,
    NoModelError,
    SmokeTestError,
    run_smoke,
)
from mledge_edge.sensors import FAULTS, DigitsSource, VibrationSensor
from mledge_edge.uplink import UplinkCounter, UplinkDecider, UplinkPolicy
from mledge_update.hashing import sha256_hex

from tests.edge.support import golden, make_classifier_model, make_kmeans_model, training_rows


def load(tmp_path, data: bytes, name: str = "m.onnx") -> LoadedModel:
    path = tmp_path / name
    path.write_bytes(data)
    return LoadedModel(path, sha256_hex(data))


def test_kmeans_flags_injected_faults_and_not_normal_readings(tmp_path):
    model = load(tmp_path, make_kmeans_model(1))
    assert model.info.family == "kmeans_anomaly" and model.info.version == 1
    sensor = VibrationSensor(seed=42, fault_rate=0.0)
    normal = [model.predict(sensor.read().features) for _ in range(200)]
    faulty = [model.predict(sensor.read(fault).features) for fault in FAULTS for _ in range(20)]
    assert sum(p.anomaly for p in normal) <= 4
    assert sum(p.anomaly for p in faulty) >= 50
    for p in normal[:5]:
        assert p.score == pytest.approx(min(p.scores))
        assert p.anomaly == (p.score > model.info.anomaly_threshold)


def test_classifier_gives_label_and_confidence(tmp_path):
    model = load(tmp_path, make_classifier_model(2))
    source = DigitsSource(seed=1)
    readings = [source.read() for _ in range(100)]
    predictions = model.predict_batch([r.features for r in readings])
    accuracy = np.mean([p.label == r.label for p, r in zip(predictions, readings, strict=True)])
    assert accuracy > 0.85
    assert all(p.score == pytest.approx(max(p.scores)) and not p.anomaly for p in predictions)


def test_model_without_conventions_is_refused(tmp_path):
    import onnx

    onx = onnx.load_from_string(make_kmeans_model(1))
    del onx.metadata_props[:]
    with pytest.raises(ModelLoadError, match=r"mledge\.family"):
        load(tmp_path, onx.SerializeToString())
    with pytest.raises(ModelLoadError, match="cannot load"):
        load(tmp_path, b"not an onnx model")


def test_smoke_checks_labels_exactly_and_scores_within_tolerance(tmp_path):
    data = make_kmeans_model(1)
    model = load(tmp_path, data)
    smoke = golden(data, training_rows(6, seed=5))
    assert run_smoke(model, smoke.inputs, smoke.outputs, smoke.tolerance) == 6
    shifted = [[s + 0.01 for s in row] for row in smoke.outputs["scores"]]
    with pytest.raises(SmokeTestError, match="tolerance"):
        run_smoke(model, smoke.inputs, {**smoke.outputs, "scores": shifted}, 1e-4)
    wrong = list(smoke.outputs["label"])
    wrong[2] = (wrong[2] + 1) % 3
    with pytest.raises(SmokeTestError, match="row 2"):
        run_smoke(model, smoke.inputs, {**smoke.outputs, "label": wrong}, 1e-4)


def test_ten_thousand_predictions_while_the_model_swaps(tmp_path):
    versions = [load(tmp_path, make_kmeans_model(v, seed=v), f"v{v}.onnx") for v in (1, 2, 3)]
    handle = ModelHandle()
    with pytest.raises(NoModelError):
        handle.predict([0.0] * 8)
    handle.swap(versions[0])
    rows = training_rows(50, seed=9)
    errors: list[BaseException] = []
    seen: list[set[int]] = [set() for _ in range(4)]
    start = threading.Barrier(5)
    done = threading.Event()

    def predictor(index: int) -> None:
        start.wait()
        try:
            for i in range(2500):
                seen[index].add(handle.predict(rows[i % len(rows)]).model_version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=predictor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    start.wait()
    swaps = 0
    while any(t.is_alive() for t in threads):
        handle.swap(versions[swaps % 3])
        swaps += 1
    for t in threads:
        t.join()
    done.set()
    assert errors == []
    assert swaps > 3
    assert set().union(*seen) <= {1, 2, 3}


def test_uplink_policy_before_and_after_a_model():
    decider = UplinkDecider(UplinkPolicy.from_document({"sample_rate": 0.1}), seed=1)
    assert all(decider.should_send(False, False)[0] for _ in range(100))
    assert decider.should_send(True, True) == (True, "flagged", 1.0)
    assert decider.should_send(False, True) == (True, "no-model", 1.0)
    sampled = sum(decider.should_send(True, False)[0] for _ in range(2000))
    assert 120 < sampled < 280
    silent = UplinkDecider(UplinkPolicy.from_document({"before_model": "none"}))
    assert not silent.should_send(False, False)[0]
    counter = UplinkCounter()
    counter.reading(False)
    counter.sent(False, "dt/a", b"12345", "telemetry")
    assert counter.snapshot()["before_model"]["bytes"] == 9


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text('{"thing": "dev-1", "model": "vibration-anomaly", "endpoint": "broker", "port": 8883,'
                    ' "cert": "c.pem", "key": "k.pem", "ca": "ca.pem", "rate": 5,'
                    ' "release_keys": "release-keys.pem"}')
    config = config_from_args(["--config", str(path), "--port", "1884", "--insecure-no-tls",
                               "--state-dir", str(tmp_path / "s")])
    assert (config.thing, config.endpoint, config.port, config.rate) == ("dev-1", "broker", 1884, 5)
    assert config.insecure_no_tls and config.cert == "c.pem"
    with pytest.raises(ConfigError, match="thing"):
        config_from_args(["--model", "m"])
    with pytest.raises(ConfigError, match="unknown config fields"):
        AgentConfig.from_mapping({"thing": "t", "colour": "red"})
    # No trusted release key and no explicit opt-out: the agent refuses to start.
    with pytest.raises(ConfigError, match="release_keys is required"):
        config_from_args(["--thing", "t", "--model", "m"])
    assert config_from_args(["--thing", "t", "--model", "m",
                             "--allow-unsigned-releases"]).allow_unsigned_releases
