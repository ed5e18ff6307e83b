"""The uplink policy thins what devices send; training must still learn the stream itself.

A stream with 5 % faults passes through the real uplink policy (every flagged reading,
2 % of the rest) with a real champion flagging; the real trainer then trains on what
was sent. Weighted by 1 / inclusion_p, it must give the threshold and clusters that
training on the whole, unfiltered stream gives. The same records without their
weights (every record counted once, as before) must not: there the faults are most of
the data and become one more "normal" cluster.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits
from trainer import synthetic
from trainer.entrypoint import main

from tests import uplink_stream as us

STREAM = 40_000
FAULT_RATE = 0.05
SAMPLE_RATE = 0.02
# Stated tolerances: thresholds within 15 % of the unfiltered training's; every cluster
# centre within 0.5 per-feature spreads (VIBRATION_SCALE) of the other model's nearest one.
THRESHOLD_TOLERANCE = 0.15
CENTRE_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, object]:
    with threadpool_limits(limits=1):
        clean, _ = us.stream(6_000, fault_rate=0.0, seed=1)
        champion_dir = tmp_path_factory.mktemp("champion")
        us.train(champion_dir, us.records(clean))
        champion = us.Model(champion_dir / "model" / "model.onnx")

        features, faults = us.stream(STREAM, fault_rate=FAULT_RATE, seed=2)
        flags = champion.flags(features)
        sent, _ = us.through_uplink(features, flags, sample_rate=SAMPLE_RATE, seed=3,
                                    start=100_000)
        unweighted = [{k: v for k, v in r.items() if k not in ("reason", "inclusion_p")}
                      for r in sent]
        out: dict[str, object] = {"features": features, "faults": faults, "flags": flags,
                                  "sent": sent}
        for name, recs in (("unfiltered", us.records(features, start=100_000)),
                           ("weighted", sent), ("unweighted", unweighted)):
            base = tmp_path_factory.mktemp(name)
            out[f"{name}_metrics"] = us.train(base, recs, version=2)
            out[name] = us.Model(base / "model" / "model.onnx")
        return out


def _gaps(trained: dict, name: str) -> tuple[float, float]:
    reference, candidate = trained["unfiltered"], trained[name]
    features = trained["features"]
    threshold_gap = abs(candidate.threshold - reference.threshold) / reference.threshold
    centres = us.centre_gap(reference.centres(features), candidate.centres(features),
                            np.array(synthetic.VIBRATION_SCALE))
    return threshold_gap, centres


def test_the_filter_over_represents_faults(trained) -> None:
    sent = trained["sent"]
    share = sum(r["reason"] == "flagged" for r in sent) / len(sent)
    assert trained["faults"].mean() == pytest.approx(FAULT_RATE, abs=0.01)
    assert share > 0.5  # what arrives is mostly faults, the stream is 5 % faults


def test_weighted_training_matches_the_unfiltered_stream(trained) -> None:
    threshold_gap, centre_gap = _gaps(trained, "weighted")
    assert threshold_gap <= THRESHOLD_TOLERANCE, threshold_gap
    assert centre_gap <= CENTRE_TOLERANCE, centre_gap
    assert trained["weighted_metrics"]["model"]["k"] == trained["unfiltered_metrics"]["model"]["k"]
    # the weights add up to about the stream the devices saw
    weight = trained["weighted_metrics"]["data"]["weight"]
    assert weight == pytest.approx(STREAM, rel=0.1)


def test_counting_each_record_once_does_not(trained) -> None:
    """The check above can fail: the old, unweighted training is outside the tolerance."""
    threshold_gap, centre_gap = _gaps(trained, "unweighted")
    assert threshold_gap > THRESHOLD_TOLERANCE or centre_gap > CENTRE_TOLERANCE


def test_flags_and_weights_are_what_the_device_sent(trained) -> None:
    sent = trained["sent"]
    assert {r["reason"] for r in sent} == {"flagged", "sample"}
    assert all(r["inclusion_p"] == 1.0 for r in sent if r["reason"] == "flagged")
    assert all(r["inclusion_p"] == SAMPLE_RATE for r in sent if r["reason"] == "sample")


def test_the_classifier_trains_on_weighted_records_too(tmp_path) -> None:
    recs = list(synthetic.digits_records(600))
    for rec in recs[1::2]:
        rec.update(reason="sample", inclusion_p=0.25)  # each stands for 4 readings
    synthetic.write_channel(tmp_path / "input" / "data" / "train", recs, per_file=300)
    synthetic.write_hyperparameters(tmp_path, synthetic.classifier_hyperparameters(
        estimator="logistic", max_iter="300"))
    assert main(["--base-dir", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["data"]["weight"] == len(recs[::2]) + 4.0 * len(recs[1::2])
    assert metrics["challenger"]["accuracy"] > 0.9


def test_the_demos_regime_shift_is_still_learned_and_released(tmp_path) -> None:
    """The demo's shift, replayed offline with its simulator: a new operating mode that
    the fleet's model flags every reading of. Weighted, the retrain learns it (it stops
    flagging it) and beats the champion by more than the demo's min_improvement."""
    from mledge_devstack.demo.device import MODE_DWELL, SHIFTED_MODES
    from mledge_devstack.demo.record import DEMO_PIPELINE_CONFIG
    from mledge_edge.sensors import MODES, VibrationSensor

    from chalicelib.config import load_pipeline_config
    from chalicelib.gate import evaluate

    vib = load_pipeline_config(DEMO_PIPELINE_CONFIG).model("vibration-anomaly")
    hp = {"k_min": "2", "k_max": "6", "seed": "7"}
    sensors = [VibrationSensor(seed=100 + d, fault_rate=0.0, mode_dwell=MODE_DWELL)
               for d in range(10)]

    def read(n: int, modes: tuple) -> np.ndarray:
        rows = []
        for i in range(n):
            sensors[i % 10].modes = modes
            rows.append(sensors[i % 10].read().features)
        return np.array(rows)

    with threadpool_limits(limits=1):
        before = [dict(r, reason="no-model", inclusion_p=1.0)
                  for r in us.records(read(806, MODES))]
        us.train(tmp_path / "v2", before, **hp)
        v2 = us.Model(tmp_path / "v2" / "model" / "model.onnx")
        shifted = read(900, SHIFTED_MODES)
        sent, _ = us.through_uplink(shifted, v2.flags(shifted), sample_rate=0.02, seed=1,
                                    start=10_000)
        metrics = us.train(tmp_path / "v3", before + sent, version=3,
                           champion=tmp_path / "v2" / "model" / "model.onnx", **hp)
        v3 = us.Model(tmp_path / "v3" / "model" / "model.onnx")
        fresh = read(2000, SHIFTED_MODES)
    assert evaluate(vib, metrics, champion_in_production=True).approved
    assert v2.flags(fresh).mean() > 0.3 and v3.flags(fresh).mean() < 0.03
