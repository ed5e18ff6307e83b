"""`classifier`: standardise + MLP (`estimator=mlp`) or logistic regression (`estimator=logistic`).

Labels are required: records without an integer `label` are skipped. Scores are
class probabilities (`scores[:, i]` belongs to class `mledge.classes[i]`).
Metrics on the holdout: `accuracy` and `macro_f1`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from mledge_update import onnx_metadata
from mledge_update.families import CLASSIFIER, FAMILY_METRICS
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from trainer.data import Split
from trainer.errors import DataError, HyperparameterError
from trainer.families.base import FittedModel, ModelFamily
from trainer.hyperparameters import CommonParams, Hyperparameters

ESTIMATORS = ("mlp", "logistic")


@dataclass(frozen=True)
class ClassifierParams:
    estimator: str
    hidden_layer_sizes: tuple[int, ...]
    max_iter: int
    alpha: float
    c: float


class ClassifierFamily(ModelFamily):
    name: ClassVar[str] = CLASSIFIER
    metrics: ClassVar[tuple[str, ...]] = FAMILY_METRICS[CLASSIFIER]
    needs_labels: ClassVar[bool] = True

    def parse_params(self, hp: Hyperparameters, common: CommonParams) -> ClassifierParams:
        if common.label_mode == "none":
            raise HyperparameterError(
                "hyperparameter 'label_mode': the classifier family needs labels; "
                "use 'required' or 'optional', got 'none'")
        estimator = hp.string("estimator", "mlp", choices=ESTIMATORS)
        # Read every key of both estimators so that neither is reported as unknown.
        hidden = hp.int_tuple("hidden_layer_sizes", (64,), minimum=1, maximum=4096)
        c = hp.number("C", 1.0, minimum=0.0, exclusive=True)
        return ClassifierParams(
            estimator=estimator,
            hidden_layer_sizes=hidden,
            max_iter=hp.integer("max_iter", 300, minimum=1, maximum=100_000),
            alpha=hp.number("alpha", 1e-4, minimum=0.0),
            c=c,
        )

    def check_data(self, params: ClassifierParams, train: Split, holdout: Split) -> None:
        assert train.labels is not None
        classes = np.unique(train.labels)
        if len(classes) < 2:
            raise DataError(
                f"too little data: the training records hold {len(classes)} class(es); "
                "a classifier needs at least 2")
        if len(holdout) < 1:
            raise DataError("too little data: no record fell into the holdout")

    def _estimator(self, params: ClassifierParams, seed: int) -> Any:
        if params.estimator == "mlp":
            return MLPClassifier(hidden_layer_sizes=params.hidden_layer_sizes,
                                 max_iter=params.max_iter, alpha=params.alpha,
                                 random_state=seed)
        return LogisticRegression(C=params.c, max_iter=params.max_iter, random_state=seed)

    def fit(self, params: ClassifierParams, common: CommonParams, train: Split,
            champion_model: bytes | None = None) -> FittedModel:
        estimator = self._estimator(params, common.seed)
        pipeline = Pipeline([("scale", StandardScaler()), ("classifier", estimator)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            # Records weighted by 1 / inclusion_p (trainer.data): the stream, not the uplink
            # filter. All-ones weights take the unweighted path (same result as before).
            weights = train.weights if train.weighted else None
            pipeline.fit(train.features, train.labels, scale__sample_weight=weights,
                         classifier__sample_weight=weights)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        n_iter = np.ravel(estimator.n_iter_)
        classes = [int(c) for c in estimator.classes_]
        details: dict[str, Any] = {
            "estimator": params.estimator,
            "classes": classes,
            "iterations": int(n_iter.max()),
            "converged": converged,
            "max_iter": params.max_iter,
        }
        if params.estimator == "mlp":
            details["hidden_layer_sizes"] = list(params.hidden_layer_sizes)
            details["alpha"] = params.alpha
        else:
            details["C"] = params.c
        return FittedModel(
            estimator=pipeline,
            details=details,
            metadata={onnx_metadata.CLASSES: json.dumps(classes)},
        )

    def library_outputs(self, fitted: FittedModel, features: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        pipeline: Pipeline = fitted.estimator
        return pipeline.predict(features).astype(np.int64), pipeline.predict_proba(features)

    def to_onnx(self, fitted: FittedModel, common: CommonParams, target_opset: dict[str, int]
                ) -> onnx.ModelProto:
        pipeline: Pipeline = fitted.estimator
        estimator = pipeline.named_steps["classifier"]
        n_classes = len(fitted.details["classes"])
        return convert_sklearn(
            pipeline,
            name=common.model_name,
            initial_types=[("input", FloatTensorType([None, len(common.features)]))],
            final_types=[("label", Int64TensorType([None])),
                         ("scores", FloatTensorType([None, n_classes]))],
            target_opset=target_opset,
            options={id(estimator): {"zipmap": False}},
        )

    def evaluate(self, fitted: FittedModel, params: ClassifierParams, common: CommonParams,
                 holdout: Split, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return classification_metrics(holdout, labels)


def classification_metrics(holdout: Split, labels: np.ndarray) -> dict[str, float]:
    """`accuracy` and `macro_f1` of predicted `labels` against the holdout's labels, each
    record weighted by its weight (all 1 when the records are unweighted)."""
    assert holdout.labels is not None
    truth, predicted = holdout.labels, np.asarray(labels, dtype=np.int64)
    weights = holdout.weights if holdout.weighted else None
    return {
        "accuracy": float(np.average(truth == predicted, weights=weights)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0,
                                   sample_weight=weights)),
    }


FAMILY = ClassifierFamily
