"""Releases for a simulated fleet without waiting for telemetry to pile up.

`train_release` runs the real trainer (`trainer.entrypoint.train`) on readings
from the device's own vibration simulator, with the pipeline's hyperparameters
for the model, and returns the training artifact (`model.tar.gz`: model.onnx,
golden.json, metrics.json). `modes` picks the machine's operating modes: a
model trained on modes the fleet never runs is the realistic bad release (it
flags nearly every reading the fleet sends; its smoke rows still pass).

`announce_release` records the version APPROVED in the registry (a recorded
manual approval: the gate is not what these runs measure) and emits the
`ModelApproved` event, so the stack's dispatcher runs the real packaging
handler, which builds the release and creates the IoT job.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mledge_edge.sensors import MODES, OperatingMode, VibrationSensor

from chalicelib.backends import training_hyperparameters
from chalicelib.config import load_pipeline_config
from chalicelib.model_events import emit_model_approved, model_approved_detail
from chalicelib.registry import Registry, Status

PROJECT_DIR = Path(__file__).resolve().parents[2]
# The pipeline's vibration model and a machine mode none of MODES resembles.
UNSEEN_MODES = (OperatingMode(shaft_hz=250.0, load=2.5, base_temp_c=70.0),)


def train_release(stack: Any, model: str, version: int, *,
                  modes: Sequence[OperatingMode] = MODES, records: int = 2000,
                  seed: int = 11, hyperparameters: dict[str, str] | None = None) -> bytes:
    """The training artifact of `model` v`version`, trained on `records` readings
    (`hyperparameters` override the pipeline's, e.g. a fixed k for a quick run)."""
    training_dir = str(PROJECT_DIR / "training_image")
    if training_dir not in sys.path:
        sys.path.insert(0, training_dir)
    from trainer import synthetic
    from trainer.entrypoint import train
    from trainer.paths import TrainingPaths

    model_config = load_pipeline_config(stack.settings.pipeline_config).model(model)
    sensor = VibrationSensor(seed=seed, fault_rate=0.0, modes=tuple(modes))
    rows = (synthetic.record(i, [round(v, 4) for v in sensor.read().features], model=model)
            for i in range(records))
    with tempfile.TemporaryDirectory(prefix="mledge-fleet-train-") as tmp:
        base = Path(tmp)
        paths = TrainingPaths.resolve(base)
        synthetic.write_channel(paths.train_channel, rows, model=model)
        synthetic.write_hyperparameters(base, {**training_hyperparameters(model_config, version),
                                               **(hyperparameters or {})})
        train(paths)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name in ("model.onnx", "golden.json", "metrics.json"):
                tar.add(paths.model_dir / name, arcname=name)
        return out.getvalue()


def announce_release(stack: Any, model: str, version: int, artifact: bytes, *,
                     reason: str) -> None:
    """Record `version` APPROVED with `artifact` and emit ModelApproved."""
    settings = stack.settings
    registry = Registry.for_settings(settings, stack.clients)
    key = f"fleet-sim/{model}/v{version:05d}/model.tar.gz"
    stack.clients.s3.put_object(Bucket=settings.bucket, Key=key, Body=artifact)
    uri = f"s3://{settings.bucket}/{key}"
    registry.create_training(model, version, {"source": "fleet simulator", "reason": reason})
    registry.transition(model, version, Status.APPROVED, expected=[Status.TRAINING],
                        reason=f"approved for a fleet run: {reason}", artifact=uri)
    detail = model_approved_detail(model, version, uri, manual=True, reason=reason)
    emit_model_approved(stack.clients.events, settings, detail)


def next_version(stack: Any, model: str) -> int:
    return Registry(stack.settings.registry_table, stack.clients.dynamodb).allocate_version(model)


def release(stack: Any, model: str, *, reason: str, modes: Sequence[OperatingMode] = MODES,
            records: int = 2000, seed: int = 11,
            hyperparameters: dict[str, str] | None = None) -> int:
    """Train, approve and announce the next version of `model`; returns its number."""
    version = next_version(stack, model)
    artifact = train_release(stack, model, version, modes=modes, records=records, seed=seed,
                             hyperparameters=hyperparameters)
    announce_release(stack, model, version, artifact, reason=reason)
    return version
