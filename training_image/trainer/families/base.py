"""What a model family provides; the entrypoint does the rest (loading, split, export, parity)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from trainer.data import Split
from trainer.hyperparameters import CommonParams, Hyperparameters


@dataclass
class FittedModel:
    """A trained estimator (scikit-learn, or a PyTorch module for `cnn`) plus what
    metrics.json and the ONNX metadata say about it."""

    estimator: Any
    details: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    # Family-private state needed to evaluate (e.g. the space silhouette is measured in).
    context: dict[str, Any] = field(default_factory=dict)


class ModelFamily(ABC):
    """One kind of model. Subclasses live one per module in `trainer.families`."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the first is the default `metric`
    needs_labels: ClassVar[bool]
    flags_anomalies: ClassVar[bool] = False  # True: `flags` says what devices flag

    @abstractmethod
    def parse_params(self, hp: Hyperparameters, common: CommonParams) -> Any:
        """Read and validate this family's own hyperparameters (raise HyperparameterError)."""

    @abstractmethod
    def check_data(self, params: Any, train: Split, holdout: Split) -> None:
        """Raise DataError when there is too little (or unsuitable) data to train."""

    @abstractmethod
    def fit(self, params: Any, common: CommonParams, train: Split,
            champion_model: bytes | None = None) -> FittedModel:
        """Train on `train`. `champion_model` is the champion's ONNX when there is one:
        a family that can warm-start from it may (the `cnn` does); the others ignore it."""

    @abstractmethod
    def library_outputs(self, fitted: FittedModel, features: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(label, scores) from the training library, the same quantities the ONNX outputs hold."""

    @abstractmethod
    def to_onnx(self, fitted: FittedModel, common: CommonParams, target_opset: dict[str, int]
                ) -> onnx.ModelProto:
        """Convert with outputs named `label` (int64) and `scores` (float32)."""

    @abstractmethod
    def evaluate(self, fitted: FittedModel, params: Any, common: CommonParams, holdout: Split,
                 labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        """Every metric of `metrics`, from a model's (label, scores) on the holdout.

        Called with the challenger's and the champion's ONNX outputs alike, so both are
        measured the same way; `fitted` is always the challenger (it defines, e.g., the
        feature space silhouette is measured in).
        """

    def flags(self, scores: np.ndarray, metadata: dict[str, str]) -> np.ndarray | None:
        """Which rows a device running this model flags (None: the family flags nothing).

        `metadata` is the ONNX model's metadata, so a champion is judged by its own
        threshold exactly as devices apply it.
        """
        return None
