"""Synthetic telemetry written the way ingest writes it (tests, bench, local runs).

`write_channel` lays out `raw/<model>/dt=YYYY-MM-DD/hour=HH/<batch>.jsonl.gz`-style
files of normalised records under a train channel directory.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

VIBRATION_FEATURES = ("rms", "peak", "crest_factor", "kurtosis", "band_low", "band_mid",
                      "band_high", "temperature")
DIGIT_FEATURES = tuple(f"px{i}" for i in range(64))
# Per-feature spread and centre of the synthetic vibration readings; an outlier sits
# OUTLIER_SIGMAS spreads away from the centre in every feature.
VIBRATION_SCALE = (1.0, 3.0, 0.5, 1.0, 0.2, 0.2, 0.2, 10.0)
VIBRATION_OFFSET = (0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 40.0)
OUTLIER_SIGMAS = 30.0


def vibration_outlier(rng: np.random.Generator) -> list[float]:
    scale, offset = np.array(VIBRATION_SCALE), np.array(VIBRATION_OFFSET)
    signs = rng.choice([-1.0, 1.0], len(scale))
    return [float(v) for v in offset + signs * scale * OUTLIER_SIGMAS]


def vibration_records(n: int, *, seed: int = 0, centers: int = 4, outlier_fraction: float = 0.0,
                      start: int = 0, model: str = "vibration-anomaly"
                      ) -> Iterator[dict[str, Any]]:
    """Readings from `centers` operating modes (Gaussian blobs) plus far-off outliers."""
    rng = np.random.default_rng(seed)
    n_features = len(VIBRATION_FEATURES)
    scale, offset = np.array(VIBRATION_SCALE), np.array(VIBRATION_OFFSET)
    modes = rng.normal(0.0, 4.0, size=(centers, n_features)) * scale + offset
    for i in range(start, start + n):
        if outlier_fraction and rng.random() < outlier_fraction:
            yield record(i, vibration_outlier(rng), model=model)
        else:
            row = modes[rng.integers(centers)] + rng.normal(0.0, 0.5, n_features) * scale
            yield record(i, [float(v) for v in row], model=model)


def digits_records(n: int, *, seed: int = 0, start: int = 0, model: str = "digits"
                   ) -> Iterator[dict[str, Any]]:
    """scikit-learn's bundled 8x8 digits, cycled and jittered to reach `n` records."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        j = i % len(images)
        row = images[j] if i < len(images) else np.clip(
            images[j] + rng.normal(0.0, 1.0, images.shape[1]), 0.0, 16.0)
        yield record(i, [round(float(v), 3) for v in row], label=int(targets[j]), model=model)


def record(i: int, features: list[float], *, label: int | None = None, model: str = "m",
           thing: str | None = None) -> dict[str, Any]:
    thing = thing or f"thing-{i % 50:03d}"
    rec: dict[str, Any] = {"id": f"{thing}-{i}", "thing": thing, "model": model,
                           "ts": 1_700_000_000.0 + i, "received_at": 1_700_000_000_000 + i * 1000,
                           "features": features}
    if label is not None:
        rec["label"] = label
    return rec


def write_channel(channel: Path, records: Iterable[dict[str, Any]], *, per_file: int = 1000,
                  model: str = "m", first_batch: int = 0) -> int:
    """Write gzip JSON-lines batches of `per_file` records under hour partitions; returns files."""
    files, batch = 0, first_batch
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal files, batch, buffer
        if not buffer:
            return
        folder = channel / "raw" / model / "dt=2024-01-01" / f"hour={batch % 24:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in buffer)
        with gzip.open(folder / f"batch-{batch:06d}.jsonl.gz", "wt", encoding="utf-8",
                       compresslevel=6) as fh:
            fh.write(body)
        files, batch, buffer = files + 1, batch + 1, []

    for rec in records:
        buffer.append(rec)
        if len(buffer) >= per_file:
            flush()
    flush()
    return files


def write_hyperparameters(base: Path, values: dict[str, Any]) -> Path:
    """`input/config/hyperparameters.json` with every value as a string, as SageMaker passes it."""
    path = base / "input" / "config" / "hyperparameters.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    path.write_text(json.dumps(strings, indent=2), encoding="utf-8")
    return path


def kmeans_hyperparameters(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "family": "kmeans_anomaly", "model_name": "vibration-anomaly", "model_version": "1",
        "metric": "silhouette", "features": json.dumps(list(VIBRATION_FEATURES)),
        "label_mode": "none", "k_min": "2", "k_max": "8", "anomaly_quantile": "0.995",
        "holdout_percent": "20", "seed": "7",
    }
    values.update(overrides)
    return values


def classifier_hyperparameters(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "family": "classifier", "model_name": "digits", "model_version": "1",
        "metric": "accuracy", "features": json.dumps(list(DIGIT_FEATURES)),
        "label_mode": "required", "estimator": "mlp", "hidden_layer_sizes": "64",
        "max_iter": "300", "holdout_percent": "20", "seed": "7",
    }
    values.update(overrides)
    return values


def cnn_hyperparameters(**overrides: Any) -> dict[str, Any]:
    """The digits CNN; small enough to train in seconds on a CPU (override `epochs`)."""
    values: dict[str, Any] = {
        "family": "cnn", "model_name": "digits", "model_version": "1",
        "metric": "accuracy", "features": json.dumps(list(DIGIT_FEATURES)),
        "label_mode": "required", "image_shape": "8,8", "input_scale": "16",
        "channels": "16,32", "dense_units": "64", "classes": "10", "epochs": "20",
        "holdout_percent": "20", "seed": "7",
    }
    values.update(overrides)
    return values
