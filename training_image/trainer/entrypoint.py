"""The training container's entrypoint (SageMaker training-container contract).

    train [train] [--base-dir DIR]          # console script
    python -m trainer.entrypoint [--base-dir DIR]

Reads `input/config/hyperparameters.json` and the `train` channel (and the
`champion` channel when it holds `model.onnx`) under the base directory
(`--base-dir`, else `$MLEDGE_TRAINING_BASE_DIR`, else /opt/ml), writes
`model/model.onnx`, `model/metrics.json` and `model/golden.json`, and returns
0. On failure it writes a one-line reason to `output/failure` and returns a
non-zero code (see trainer.errors). SageMaker starts the image as
`docker run IMAGE train`, hence the optional `train` argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trainer import onnx_export
from trainer.columnar import load_channel
from trainer.data import FAULT, NORMAL, Dataset, Split, describe_skipped, split_dataset
from trainer.detection import detection_rates, parse_fault_rules, resolve_verdicts
from trainer.errors import ChampionError, DataError, TrainingError
from trainer.families import ModelFamily, get_family
from trainer.families.base import FittedModel
from trainer.hyperparameters import CommonParams, Hyperparameters
from trainer.paths import BASE_DIR_ENV, DEFAULT_BASE_DIR, TrainingPaths

MIN_USABLE_RECORDS = 10
FAILURE_REASON_MAX_CHARS = 1000  # SageMaker shows the first 1024 characters as FailureReason
INTERNAL_ERROR_EXIT = 70


def log(message: str) -> None:
    print(f"[trainer] {message}", flush=True)


def load_champion(path: Path, common: CommonParams) -> tuple[bytes, ort.InferenceSession] | None:
    """The champion ONNX (bytes and session), checked against the conventions; None without one.

    Loaded before training, so a broken champion fails the run before a long fit."""
    if not path.is_file():
        return None
    model_bytes = path.read_bytes()
    try:
        sess = onnx_export.session(model_bytes)
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise ChampionError(f"champion model.onnx cannot be loaded: {exc}") from None
    onnx_export.check_conventions(sess, len(common.features), what="champion")
    return model_bytes, sess


def _run_champion(sess: ort.InferenceSession, features: np.ndarray,
                  what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return onnx_export.run(sess, features)
    except Exception as exc:
        raise ChampionError(f"champion model.onnx failed on the {what}: {exc}") from None


def score_champion(sess: ort.InferenceSession | None, family: ModelFamily, fitted: FittedModel,
                   params: Any, common: CommonParams, holdout: Split) -> dict[str, float] | None:
    """The champion ONNX's metrics on the challenger's holdout, or None without a champion."""
    if sess is None:
        return None
    outputs = _run_champion(sess, holdout.features, "holdout")
    return family.evaluate(fitted, params, common, holdout, *outputs)


def score_detection(family: ModelFamily, challenger: ort.InferenceSession,
                    metadata: dict[str, str], champion: ort.InferenceSession | None,
                    labelled: Dataset, verdicts: np.ndarray, excluded: int) -> dict[str, Any] | None:
    """Detection of the readings with a verdict, by the challenger's exported model (with
    its `metadata`) and the champion's (with its own). None for families that flag nothing.
    """
    if not family.flags_anomalies:
        return None
    if not len(labelled):
        none = detection_rates(np.empty(0, dtype=bool), verdicts)
        return {"labelled_faults": 0, "labelled_normal": 0,
                "faults_kept_out_of_training": excluded, "challenger": none,
                "champion": none if champion is not None else None}
    challenger_flags = family.flags(onnx_export.run(challenger, labelled.features)[1], metadata)
    assert challenger_flags is not None
    report: dict[str, Any] = {
        "labelled_faults": int(np.sum(verdicts == FAULT)),
        "labelled_normal": int(np.sum(verdicts == NORMAL)),
        "faults_kept_out_of_training": excluded,
        "challenger": detection_rates(challenger_flags, verdicts),
        "champion": None,
    }
    if champion is not None:
        meta = dict(champion.get_modelmeta().custom_metadata_map)
        _, scores = _run_champion(champion, labelled.features, "labelled readings")
        champion_flags = family.flags(scores, meta)
        assert champion_flags is not None
        report["champion"] = detection_rates(champion_flags, verdicts)
    return report


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(value: Any, *, indent: int | None = 2) -> bytes:
    separators = (",", ":") if indent is None else None
    return (json.dumps(value, indent=indent, separators=separators, allow_nan=False)
            + "\n").encode()


def train(paths: TrainingPaths, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """One training run; returns the metrics it wrote. Raises TrainingError subclasses.

    `timings`, when given, receives seconds per phase (load, split, fit, export,
    evaluate, write): bench/train.py reads them; metrics.json keeps to the contract.
    """
    phase = _Phases(timings)
    hp = Hyperparameters.load(paths.hyperparameters_file)
    family = get_family(hp.string("family"))
    common = CommonParams.parse(hp, family.name, family.metrics)
    params = family.parse_params(hp, common)
    hp.check_all_read(family.name)
    log(f"model {common.model_name} v{common.model_version}, family {family.name}, "
        f"{len(common.features)} features, params {params}")

    phase.start()
    data = load_channel(paths.train_channel, len(common.features),
                        with_labels=family.needs_labels)
    log(f"loaded {len(data)} usable records from {data.files} files in "
        f"{phase.end('load'):.2f}s; skipped {data.skipped} "
        f"({describe_skipped(data.skipped_reasons)})")
    verdicts = resolve_verdicts(data, parse_fault_rules(common.fault_rules, common.features))
    confirmed_faults = verdicts == FAULT
    labelled = data.subset(verdicts != "")
    labelled_verdicts = verdicts[verdicts != ""]
    # Confirmed faults are what the model must flag: never part of what it learns as typical.
    data = data.subset(~confirmed_faults)
    if len(data) < MIN_USABLE_RECORDS:
        raise DataError(
            f"too little data: {len(data)} usable records (need at least {MIN_USABLE_RECORDS}); "
            f"skipped {data.skipped}: {describe_skipped(data.skipped_reasons)}")
    log(f"{int(confirmed_faults.sum())} confirmed faults kept out of training; "
        f"{len(labelled)} readings with a verdict; weight {float(data.weight_array().sum()):.0f} "
        f"over {len(data)} records")
    train_split, holdout = split_dataset(data, common.holdout_percent)
    phase.end("split")
    family.check_data(params, train_split, holdout)
    champion_loaded = load_champion(paths.champion_model, common)
    champion_bytes, champion_sess = champion_loaded or (None, None)

    fitted = family.fit(params, common, train_split, champion_bytes)
    log(f"fitted on {len(train_split)} records in {phase.end('fit'):.2f}s: {fitted.details}")

    model_bytes = onnx_export.finalize(
        family.to_onnx(fitted, common, onnx_export.TARGET_OPSET), common, fitted.metadata)
    sess = onnx_export.session(model_bytes)
    onnx_export.check_conventions(sess, len(common.features), what="challenger")
    phase.end("export")
    exported = onnx_export.run(sess, holdout.features)
    parity = onnx_export.parity(family.library_outputs(fitted, holdout.features), exported)
    challenger = family.evaluate(fitted, params, common, holdout, *exported)
    champion = score_champion(champion_sess, family, fitted, params, common, holdout)
    detection = score_detection(family, sess, fitted.metadata, champion_sess, labelled,
                                labelled_verdicts, int(confirmed_faults.sum()))
    log(f"challenger {challenger}, champion {champion}, detection {detection}, parity {parity} "
        f"(evaluated in {phase.end('evaluate'):.2f}s)")

    metrics: dict[str, Any] = {
        "family": family.name,
        "metric": common.metric,
        "challenger": challenger,
        "champion": champion,
        "parity": parity.to_dict(),
        "detection": detection,
        "data": {
            "records": len(data),
            "weight": float(data.weight_array().sum()),
            "train": len(train_split),
            "holdout": len(holdout),
            "files": data.files,
            "skipped_records": data.skipped,
        },
        "model": fitted.details,
        "onnx": onnx_export.describe(model_bytes),
    }
    golden = onnx_export.golden(holdout.features, exported)
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(paths.model_file, model_bytes)
    _write_atomically(paths.golden_file, _json_bytes(golden, indent=None))
    _write_atomically(paths.metrics_file, _json_bytes(_plain(metrics)))
    phase.end("write")
    log(f"wrote {paths.model_dir} ({len(model_bytes)} bytes of ONNX); {phase.total():.2f}s total")
    return metrics


class _Phases:
    """Seconds per phase, each measured from the end of the previous one."""

    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink = sink if sink is not None else {}
        self.started = self.mark = time.perf_counter()

    def start(self) -> None:
        self.mark = time.perf_counter()

    def end(self, name: str) -> float:
        now = time.perf_counter()
        self.sink[name] = now - self.mark
        self.mark = now
        return self.sink[name]

    def total(self) -> float:
        return time.perf_counter() - self.started


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_failure(paths: TrainingPaths, reason: str) -> None:
    one_line = " ".join(reason.split())[:FAILURE_REASON_MAX_CHARS]
    try:
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        paths.failure_file.write_text(one_line + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"[trainer] cannot write {paths.failure_file}: {exc}", file=sys.stderr)
    print(f"[trainer] FAILED: {one_line}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train", description="MLEdgeDeploy training container entrypoint")
    parser.add_argument("command", nargs="?", choices=["train"], default="train",
                        help="SageMaker starts training containers with the argument 'train'")
    parser.add_argument("--base-dir", default=None,
                        help=f"SageMaker directory layout root (default ${BASE_DIR_ENV} "
                             f"or {DEFAULT_BASE_DIR})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = TrainingPaths.resolve(args.base_dir)
    # Outputs left by an earlier run in the same directory must not outlive this one:
    # a failed run must not leave a model that looks trained.
    for stale in (paths.failure_file, paths.model_file, paths.metrics_file, paths.golden_file):
        stale.unlink(missing_ok=True)
    try:
        train(paths)
    except TrainingError as exc:
        write_failure(paths, str(exc))
        return exc.exit_code
    except MemoryError:
        write_failure(paths, "out of memory: use a larger instance or fewer records")
        return INTERNAL_ERROR_EXIT
    except Exception as exc:
        traceback.print_exc()
        write_failure(paths, f"internal error: {type(exc).__name__}: {exc}")
        return INTERNAL_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
