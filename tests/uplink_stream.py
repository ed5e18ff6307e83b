"""A sensor stream with faults, passed through the device's real uplink policy (tests, bench).

Normal readings come from a few operating modes; a fault is a tight blob of its own
(bearing wear: high peak and kurtosis), so an over-represented fault looks like one
more operating mode to k-means, which is how a filtered dataset teaches a retrain to
call faults normal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from mledge_edge.uplink import UplinkDecider, UplinkPolicy
from trainer import synthetic
from trainer.entrypoint import main as train_main

FAULT_SHIFT = np.array([0.0, 25.0, 2.0, 9.0, 0.0, 0.0, 0.0, 0.0])


def stream(n: int, *, fault_rate: float, seed: int, centers: int = 3
           ) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 8], is_fault [n]) from `centers` operating modes and a fault mode."""
    rng = np.random.default_rng(seed)
    scale, offset = np.array(synthetic.VIBRATION_SCALE), np.array(synthetic.VIBRATION_OFFSET)
    modes = np.random.default_rng(1234).normal(0.0, 4.0, size=(centers, 8)) * scale + offset
    which = rng.integers(centers, size=n)
    rows = modes[which] + rng.normal(0.0, 0.5, size=(n, 8)) * scale
    faults = rng.random(n) < fault_rate
    rows[faults] = modes[0] + FAULT_SHIFT * scale + rng.normal(0.0, 0.3, size=(int(faults.sum()), 8)) * scale
    return rows.astype(np.float64), faults


def records(features: np.ndarray, *, start: int = 0) -> list[dict[str, Any]]:
    return [synthetic.record(start + i, [float(v) for v in row])
            for i, row in enumerate(features)]


def through_uplink(features: np.ndarray, flags: np.ndarray, *, sample_rate: float, seed: int,
                   start: int = 0) -> tuple[list[dict[str, Any]], np.ndarray]:
    """What the devices send of the stream (the agent's record fields) and which were sent."""
    decider = UplinkDecider(UplinkPolicy.from_document({"sample_rate": sample_rate}), seed=seed)
    sent, mask = [], np.zeros(len(features), dtype=bool)
    for i, (row, flagged) in enumerate(zip(features, flags, strict=True)):
        send, reason, p = decider.should_send(True, bool(flagged))
        if send:
            rec = synthetic.record(start + i, [float(v) for v in row])
            rec.update(reason=reason, inclusion_p=p, anomaly=bool(flagged))
            sent.append(rec)
            mask[i] = True
    return sent, mask


def train(base: Path, recs: list[dict[str, Any]], *, version: int = 1,
          champion: Path | None = None, **hyperparameters: Any) -> dict[str, Any]:
    """The real trainer on these records; returns metrics.json (model in base/model)."""
    synthetic.write_channel(base / "input" / "data" / "train", recs, per_file=2000)
    synthetic.write_hyperparameters(base, synthetic.kmeans_hyperparameters(
        model_version=str(version), **hyperparameters))
    if champion is not None:
        target = base / "input" / "data" / "champion" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(champion.read_bytes())
    code = train_main(["--base-dir", str(base)])
    failure = base / "output" / "failure"
    assert code == 0, failure.read_text() if failure.exists() else "no failure file"
    return json.loads((base / "model" / "metrics.json").read_text())


class Model:
    """A trained model.onnx as a device runs it (nearest-centroid distance > threshold)."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.threshold = float(meta["mledge.anomaly_threshold"])

    def outputs(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label, scores = self.session.run(None, {"input": features.astype(np.float32)})
        return np.asarray(label), np.asarray(scores)

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.outputs(features)[1].min(axis=1) > self.threshold

    def centres(self, features: np.ndarray) -> np.ndarray:
        """Mean raw reading per cluster the model assigns `features` to (the clusters it
        learned, in sensor units, comparable across models with different scalers)."""
        labels = self.outputs(features)[0]
        return np.array([features[labels == c].mean(axis=0) for c in np.unique(labels)])


def centre_gap(reference: np.ndarray, candidate: np.ndarray, scale: np.ndarray) -> float:
    """Largest distance (in units of `scale` per feature) from a reference centre to the
    nearest candidate centre, and back: 0 when both models found the same clusters."""
    a, b = reference / scale, candidate / scale
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


Trainer = Callable[..., dict[str, Any]]
