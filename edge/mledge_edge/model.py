"""Loaded ONNX models and the hot-swappable model handle a host application embeds.

A `LoadedModel` is immutable once built: it owns one onnxruntime session and the
metadata read from the model (the keys of mledge_update.onnx_metadata). A `ModelHandle` holds a
reference to the newest installed `LoadedModel`; `predict` reads that reference
once (an atomic attribute read, no lock) and runs on it, so a swap never blocks
or drops an inference: calls already running finish on the model they started
with, and the old session is freed when the last of them returns.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from mledge_update import onnx_metadata as meta_keys
from mledge_update.families import FAMILIES, KMEANS_ANOMALY

INPUT_NAME = "input"


class ModelLoadError(Exception):
    """The file is not a model this device can serve (bad ONNX, missing conventions)."""


class NoModelError(Exception):
    """predict() was called before any model was installed."""


@dataclass(frozen=True)
class Prediction:
    """One reading's result. `score` is the nearest-centroid distance (k-means) or the
    winning class probability (classifier, i.e. the confidence)."""

    label: int
    score: float
    anomaly: bool
    model_version: int
    scores: tuple[float, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    family: str
    features: tuple[str, ...]
    n_features: int
    anomaly_threshold: float | None
    sha256: str


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Devices are small and the host runs other work: one thread per call by default.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class LoadedModel:
    """One ONNX model in its own onnxruntime session, with its metadata."""

    def __init__(self, path: str | Path, sha256: str, threads: int = 1) -> None:
        self.path = Path(path)
        try:
            self._session = ort.InferenceSession(
                str(self.path), _session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"onnxruntime cannot load {self.path.name}: {exc}") from exc
        self.info = self._read_info(sha256)
        self._input_name = INPUT_NAME

    def _read_info(self, sha256: str) -> ModelInfo:
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            names = [i.name for i in inputs]
            raise ModelLoadError(f"model must have one input named {INPUT_NAME!r}, has {names}")
        shape = inputs[0].shape
        if len(shape) != 2 or not isinstance(shape[1], int):
            raise ModelLoadError(f"model input must be [N, n_features], is {shape}")
        outputs = {o.name for o in self._session.get_outputs()}
        if not {"label", "scores"} <= outputs:
            raise ModelLoadError(f"model outputs must include 'label' and 'scores', has {sorted(outputs)}")
        meta = self._session.get_modelmeta().custom_metadata_map
        family = meta.get(meta_keys.FAMILY, "")
        if family not in FAMILIES:
            raise ModelLoadError(f"mledge.family must be one of {FAMILIES}, is {family!r}")
        try:
            version = int(meta.get(meta_keys.VERSION, ""))
        except ValueError as exc:
            raise ModelLoadError("mledge.version metadata is missing or not an integer") from exc
        try:
            features = tuple(str(f) for f in json.loads(meta.get(meta_keys.FEATURES, "[]")))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError("mledge.features metadata is not a JSON list") from exc
        if features and len(features) != shape[1]:
            raise ModelLoadError(
                f"mledge.features names {len(features)} features but the input takes {shape[1]}"
            )
        threshold: float | None = None
        if family == KMEANS_ANOMALY:
            try:
                threshold = float(meta[meta_keys.ANOMALY_THRESHOLD])
            except (KeyError, ValueError) as exc:
                raise ModelLoadError("k-means model lacks a numeric mledge.anomaly_threshold") from exc
            if not math.isfinite(threshold):
                raise ModelLoadError("mledge.anomaly_threshold is not finite")
        return ModelInfo(
            name=meta.get(meta_keys.MODEL, ""),
            version=version,
            family=family,
            features=features,
            n_features=int(shape[1]),
            anomaly_threshold=threshold,
            sha256=sha256,
        )

    def run(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs (label [N], scores [N, k]) for a float32 [N, n_features] batch."""
        label, scores = self._session.run(["label", "scores"], {self._input_name: rows})
        return np.asarray(label), np.asarray(scores)

    def predict_batch(self, rows: Sequence[Sequence[float]] | np.ndarray) -> list[Prediction]:
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim == 1:
            batch = batch.reshape(1, -1)
        if batch.ndim != 2 or batch.shape[1] != self.info.n_features:
            raise ValueError(
                f"expected rows of {self.info.n_features} features, got shape {batch.shape}"
            )
        labels, scores = self.run(batch)
        results = []
        for label, row in zip(labels.tolist(), scores.tolist(), strict=True):
            if self.info.family == KMEANS_ANOMALY:
                nearest = float(min(row))
                assert self.info.anomaly_threshold is not None
                anomaly = nearest > self.info.anomaly_threshold
                score = nearest
            else:
                score = float(max(row))
                anomaly = False
            results.append(
                Prediction(int(label), score, anomaly, self.info.version, tuple(float(s) for s in row))
            )
        return results

    def predict(self, features: Sequence[float]) -> Prediction:
        return self.predict_batch([features])[0]


class ModelHandle:
    """The newest installed model, swappable while other threads predict.

    Readers never take a lock: `_current` is replaced, never mutated, and reading
    one attribute is atomic in CPython. Writers (swaps) serialise on a lock only
    among themselves.
    """

    def __init__(self, model: LoadedModel | None = None) -> None:
        self._current: LoadedModel | None = model
        self._swap_lock = threading.Lock()
        self._swaps = 0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def info(self) -> ModelInfo | None:
        model = self._current
        return model.info if model is not None else None

    @property
    def swaps(self) -> int:
        return self._swaps

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make `model` the one every later predict uses; returns the previous one."""
        with self._swap_lock:
            previous = self._current
            self._current = model
            self._swaps += 1
            return previous

    def predict(self, features: Sequence[float]) -> Prediction:
        model = self._current  # one read: this call uses this model to the end
        if model is None:
            raise NoModelError("no model is installed yet")
        return model.predict(features)

    def predict_batch(self, rows: Sequence[Sequence[float]] | np.ndarray) -> list[Prediction]:
        model = self._current
        if model is None:
            raise NoModelError("no model is installed yet")
        return model.predict_batch(rows)


class SmokeTestError(Exception):
    """The model's outputs on the job's golden rows differ from the expected ones."""


def run_smoke(model: LoadedModel, inputs: Sequence[Sequence[float]], outputs: dict[str, Any],
              tolerance: float) -> int:
    """Check golden rows: labels exactly, scores within `tolerance` (absolute, or relative
    to the expected value when that is larger than 1, since k-means distances can be large).
    Returns the number of rows checked."""
    if not inputs:
        return 0
    batch = np.asarray(inputs, dtype=np.float32)
    if batch.ndim != 2 or batch.shape[1] != model.info.n_features:
        raise SmokeTestError(
            f"smoke inputs have shape {batch.shape}, model takes {model.info.n_features} features"
        )
    labels, scores = model.run(batch)
    if "label" in outputs:
        expected_labels = np.asarray(outputs["label"]).reshape(-1)
        if expected_labels.shape != labels.reshape(-1).shape:
            raise SmokeTestError(f"smoke expects {expected_labels.shape[0]} labels, model gave {labels.size}")
        wrong = np.nonzero(expected_labels.astype(np.int64) != labels.reshape(-1).astype(np.int64))[0]
        if wrong.size:
            row = int(wrong[0])
            raise SmokeTestError(
                f"smoke row {row}: label {int(labels.reshape(-1)[row])} != expected {int(expected_labels[row])}"
                f" ({wrong.size} of {expected_labels.size} rows differ)"
            )
    if "scores" in outputs:
        expected_scores = np.asarray(outputs["scores"], dtype=np.float64)
        if expected_scores.shape != scores.shape:
            raise SmokeTestError(f"smoke scores shape {expected_scores.shape} != model's {scores.shape}")
        allowed = tolerance * np.maximum(1.0, np.abs(expected_scores))
        diff = np.abs(scores.astype(np.float64) - expected_scores)
        if not np.all(diff <= allowed):
            worst = float(np.max(diff - allowed))
            raise SmokeTestError(
                f"smoke scores differ beyond tolerance {tolerance} (worst excess {worst:.3g})"
            )
    return int(batch.shape[0])
