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


def write_verdicts(channel: Path, verdicts: dict[str, str], name: str = "v1") -> None:
    """Verdict lines as `mledge label` writes them under labels/<model>/ in the channel."""
    import gzip

    folder = channel / "labels" / "vibration-anomaly"
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"verdict_of": rid, "verdict": v, "by": "test"}) + "\n"
                   for rid, v in verdicts.items())
    with gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(body)


def retrain_after_faults(base: Path, *, labelled_share: float, fault_rules: str = "",
                         stream_size: int = 30_000, fault_rate: float = 0.05,
                         weighted: bool = True) -> dict[str, Any]:
    """The issue's story: v1 trained on a clean stream is released; faults start; devices
    send what v1 flags plus a 2 % sample; an operator labels `labelled_share` of the
    flagged faults; v2 is trained on everything sent (with v1 as champion).

    `weighted=False` replays the loop before records said why they were sent (every
    record counted once). Returns v2's metrics, and v1's and v2's detection of fresh
    faults."""
    clean, _ = stream(6_000, fault_rate=0.0, seed=1)
    us_v1 = base / "v1"
    train(us_v1, records(clean))
    v1 = Model(us_v1 / "model" / "model.onnx")
    features, faults = stream(stream_size, fault_rate=fault_rate, seed=2)
    flags = v1.flags(features)
    sent, mask = through_uplink(features, flags, sample_rate=0.02, seed=3, start=100_000)
    if not weighted:
        sent = [{k: v for k, v in r.items() if k not in ("reason", "inclusion_p")}
                for r in sent]
    ids = [f"thing-{(100_000 + i) % 50:03d}-{100_000 + i}" for i in range(len(features))]
    flagged_faults = [ids[i] for i in range(len(features)) if mask[i] and flags[i] and faults[i]]
    rng = np.random.default_rng(4)
    chosen = rng.choice(len(flagged_faults), int(len(flagged_faults) * labelled_share),
                        replace=False) if flagged_faults else []
    us_v2 = base / "v2"
    write_verdicts(us_v2 / "input" / "data" / "train", {flagged_faults[i]: "fault" for i in chosen})
    extra = {"fault_rules": fault_rules} if fault_rules else {}
    metrics = train(us_v2, records(clean) + sent, version=2,
                    champion=us_v1 / "model" / "model.onnx", **extra)
    v2 = Model(us_v2 / "model" / "model.onnx")
    fresh, fresh_faults = stream(20_000, fault_rate=0.05, seed=9)
    return {"metrics": metrics,
            "v1_detection": float(v1.flags(fresh[fresh_faults]).mean()),
            "v2_detection": float(v2.flags(fresh[fresh_faults]).mean()),
            "v1_false_alarms": float(v1.flags(fresh[~fresh_faults]).mean()),
            "v2_false_alarms": float(v2.flags(fresh[~fresh_faults]).mean()),
            "sent": len(sent), "sent_faults": int((mask & faults).sum())}


def retrain_after_shift(base: Path, *, stream_size: int = 30_000, weighted: bool = True
                        ) -> dict[str, Any]:
    """A regime shift instead of faults: the line starts running in a fourth operating
    mode (half the readings), which v1 flags because it never saw it; v2 must learn it.
    Returns v2's metrics and the false-alarm rate of v1 and v2 on the new regime."""
    clean, _ = stream(6_000, fault_rate=0.0, seed=1)
    train(base / "v1", records(clean))
    v1 = Model(base / "v1" / "model" / "model.onnx")
    shifted = _shifted(stream_size, seed=5)
    flags = v1.flags(shifted)
    sent, _ = through_uplink(shifted, flags, sample_rate=0.02, seed=3, start=200_000)
    if not weighted:
        sent = [{k: v for k, v in r.items() if k not in ("reason", "inclusion_p")}
                for r in sent]
    metrics = train(base / "v2", records(clean) + sent, version=2,
                    champion=base / "v1" / "model" / "model.onnx")
    v2 = Model(base / "v2" / "model" / "model.onnx")
    fresh = _shifted(20_000, seed=6)
    return {"metrics": metrics, "v1_false_alarms": float(v1.flags(fresh).mean()),
            "v2_false_alarms": float(v2.flags(fresh).mean()), "sent": len(sent)}


def _shifted(n: int, *, seed: int) -> np.ndarray:
    rows, _ = stream(n, fault_rate=0.0, seed=seed)
    rng = np.random.default_rng(seed + 100)
    new_mode = rng.random(n) < 0.5
    scale = np.array(synthetic.VIBRATION_SCALE)
    rows[new_mode] += np.array([6.0, 6.0, 0.0, 0.0, 3.0, 3.0, 3.0, 2.0]) * scale
    return rows
