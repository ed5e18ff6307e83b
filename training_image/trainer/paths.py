"""SageMaker's training-container directory layout under one overridable base directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_DIR = "/opt/ml"
BASE_DIR_ENV = "MLEDGE_TRAINING_BASE_DIR"


@dataclass(frozen=True)
class TrainingPaths:
    """Where SageMaker puts inputs and collects outputs, relative to `base` (default /opt/ml)."""

    base: Path

    @classmethod
    def resolve(cls, base_dir: str | os.PathLike[str] | None = None) -> TrainingPaths:
        """`base_dir` if given, else `$MLEDGE_TRAINING_BASE_DIR`, else /opt/ml."""
        chosen = base_dir or os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR
        return cls(Path(chosen))

    @property
    def hyperparameters_file(self) -> Path:
        return self.base / "input" / "config" / "hyperparameters.json"

    def channel(self, name: str) -> Path:
        return self.base / "input" / "data" / name

    @property
    def train_channel(self) -> Path:
        return self.channel("train")

    @property
    def champion_model(self) -> Path:
        return self.channel("champion") / "model.onnx"

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def model_file(self) -> Path:
        return self.model_dir / "model.onnx"

    @property
    def metrics_file(self) -> Path:
        return self.model_dir / "metrics.json"

    @property
    def golden_file(self) -> Path:
        return self.model_dir / "golden.json"
