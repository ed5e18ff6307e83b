"""ONNX conventions (docs/training.md), the parity check and the golden rows.

Conventions: one input `input` float32 [N, n_features]; outputs `label` int64 [N]
and `scores` float32 [N, k]; metadata `mledge.model`, `mledge.version`,
`mledge.family`, `mledge.features` (+ family keys such as
`mledge.anomaly_threshold`); initializers sorted by name and the graph named
after the model, so two exports of the same structure differ only where
weights differ (small deltas). Opsets are capped at TARGET_OPSET, which every
onnxruntime since 1.13 runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from mledge_update import onnx_metadata

from trainer.errors import ChampionError, ExportError
from trainer.hyperparameters import CommonParams

TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
INPUT_NAME = "input"
OUTPUT_NAMES = ("label", "scores")
PARITY_MIN_LABEL_AGREEMENT = 0.999
PARITY_MAX_ABS_DIFF = 1e-3
GOLDEN_ROWS = 8
GOLDEN_TOLERANCE = 1e-4


def finalize(model: onnx.ModelProto, common: CommonParams, extra_metadata: dict[str, str]
             ) -> bytes:
    """Apply the naming/metadata conventions and return the serialised model."""
    graph = model.graph
    graph.name = common.model_name
    initializers = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    model.model_version = common.model_version
    model.doc_string = ""
    metadata = {
        onnx_metadata.MODEL: common.model_name,
        onnx_metadata.VERSION: str(common.model_version),
        onnx_metadata.FAMILY: common.family,
        onnx_metadata.FEATURES: json.dumps(list(common.features)),
        **extra_metadata,
    }
    del model.metadata_props[:]
    for key in sorted(metadata):
        model.metadata_props.add(key=key, value=metadata[key])
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX model is invalid: {str(exc).splitlines()[0]}") from None
    return model.SerializeToString()


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check_conventions(sess: ort.InferenceSession, n_features: int, *, what: str) -> None:
    """Raise ExportError (challenger) / ChampionError (champion) naming the broken convention."""
    error = ChampionError if what == "champion" else ExportError
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(float)":
        found = [(i.name, i.type) for i in inputs]
        raise error(f"{what} ONNX must have one float input named 'input', has {found}")
    width = inputs[0].shape[-1] if inputs[0].shape else None
    if isinstance(width, int) and width != n_features:
        raise error(f"{what} ONNX takes {width} features, the schema has {n_features}")
    found_outputs = {o.name: o.type for o in outputs}
    expected = {"label": "tensor(int64)", "scores": "tensor(float)"}
    if any(found_outputs.get(name) != kind for name, kind in expected.items()):
        raise error(f"{what} ONNX outputs must be label:int64 and scores:float, "
                    f"has {found_outputs}")


def run(sess: ort.InferenceSession, features: np.ndarray, batch_rows: int = 65_536
        ) -> tuple[np.ndarray, np.ndarray]:
    """(label int64 [N], scores float32 [N, k]), in batches to bound memory."""
    labels, scores = [], []
    x = np.ascontiguousarray(features, dtype=np.float32)
    for start in range(0, max(len(x), 1), batch_rows):
        label, score = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x[start:start + batch_rows]})
        labels.append(np.asarray(label).reshape(-1))
        scores.append(np.asarray(score))
    return np.concatenate(labels), np.concatenate(scores)


@dataclass(frozen=True)
class Parity:
    passed: bool
    max_abs_diff: float
    label_agreement: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity(library: tuple[np.ndarray, np.ndarray], exported: tuple[np.ndarray, np.ndarray]
           ) -> Parity:
    """Passed when labels agree on >= 99.9 % of rows and no score differs by more than 1e-3."""
    lib_labels, lib_scores = library
    onnx_labels, onnx_scores = exported
    rows = len(lib_labels)
    if rows == 0:
        return Parity(False, float("inf"), 0.0, 0)
    agreement = float(np.mean(np.asarray(lib_labels) == np.asarray(onnx_labels)))
    if np.shape(lib_scores) != np.shape(onnx_scores):
        return Parity(False, float("inf"), agreement, rows)
    diff = float(np.max(np.abs(np.asarray(lib_scores, dtype=np.float64)
                               - np.asarray(onnx_scores, dtype=np.float64))))
    passed = bool(agreement >= PARITY_MIN_LABEL_AGREEMENT and diff <= PARITY_MAX_ABS_DIFF)
    return Parity(passed, diff, agreement, rows)


def golden(features: np.ndarray, exported: tuple[np.ndarray, np.ndarray],
           rows: int = GOLDEN_ROWS) -> dict[str, Any]:
    """The device smoke test: a few inputs and the ONNX outputs expected for them."""
    labels, scores = exported
    # float(np.float32) is exact, so a device feeding these back as float32 gets the same bits.
    return {
        "input_name": INPUT_NAME,
        "inputs": [[float(v) for v in row] for row in features[:rows]],
        "outputs": {
            "label": [int(v) for v in labels[:rows]],
            "scores": [[float(v) for v in row] for row in scores[:rows]],
        },
        "tolerance": GOLDEN_TOLERANCE,
    }


def describe(model_bytes: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(model_bytes).hexdigest(), "size": len(model_bytes)}
