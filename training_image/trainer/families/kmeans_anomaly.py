"""`kmeans_anomaly`: standardise, k-means with k chosen by silhouette, a learned anomaly threshold.

- Features are standardised inside the model (a Scaler node in the ONNX graph):
  raw sensor features have very different scales (temperature vs kurtosis), and
  distances between standardised values stay small, which keeps float32 ONNX
  distances within the parity tolerance.
- k is chosen in [k_min, k_max] by the silhouette score of k-means fitted on a
  bounded random sample of the training rows (`selection_rows`, silhouette on
  `silhouette_rows` of them): the smallest k whose silhouette is within
  `k_tolerance` of the best (fewer clusters for a negligible loss: a smaller,
  steadier model). The final model is fitted on all training rows, started from
  the chosen sample fit's centroids.
- Before choosing k, the rows farther from a rough k_max-means fit than the
  `anomaly_quantile` quantile are set aside (and again before the final fit), so
  the anomalies in the data do not get clusters of their own.
- The anomaly threshold is the `anomaly_quantile` quantile of each training
  row's distance to its nearest centroid. It is stored in the ONNX metadata
  (`mledge.anomaly_threshold`): a device flags a reading whose smallest `scores`
  value exceeds it and needs nothing else.
- Metric `silhouette` on the holdout (a seeded sample of at most `silhouette_rows`),
  always in this training's standardised space so that champion and challenger
  are measured in the same space.
- Records carry a weight (1 / the probability the device sent them, trainer.data):
  the scaler, both k-means fits, the trimming and threshold quantiles and the
  silhouette are all weighted, so a dataset thinned by the uplink policy trains the
  model the unthinned stream would. With every weight 1 each step is exactly the
  unweighted computation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from mledge_update import onnx_metadata
from mledge_update.families import FAMILY_METRICS, KMEANS_ANOMALY
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import pairwise_distances, silhouette_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from trainer.data import Split
from trainer.errors import ChampionError, DataError, HyperparameterError
from trainer.families.base import FittedModel, ModelFamily
from trainer.hyperparameters import CommonParams, Hyperparameters

WORST_SILHOUETTE = -1.0


@dataclass(frozen=True)
class KMeansParams:
    k_min: int
    k_max: int
    anomaly_quantile: float
    k_tolerance: float
    selection_rows: int
    silhouette_rows: int
    n_init: int
    max_iter: int


def safe_silhouette(points: np.ndarray, labels: np.ndarray, rows: int, seed: int,
                    weights: np.ndarray | None = None) -> float:
    """Silhouette on a seeded sample of at most `rows` rows; -1 (the worst) when undefined.

    Undefined means fewer than 2 clusters, or as many clusters as points, in the sample.
    With `weights` (not all 1) it is the weighted silhouette (`weighted_silhouette`).
    """
    if len(points) > rows:
        idx = np.sort(np.random.default_rng(seed).choice(len(points), rows, replace=False))
        points, labels = points[idx], labels[idx]
        weights = weights[idx] if weights is not None else None
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(points) - 1:
        return WORST_SILHOUETTE
    if weights is not None and np.any(weights != 1.0):
        return weighted_silhouette(points, labels, weights)
    return float(silhouette_score(points, labels))


def weighted_silhouette(points: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """The silhouette of the population each point stands for (`weights[i]` copies of it).

    a(i): weighted mean distance to the rest of its own cluster (its own weight left out,
    as scikit-learn leaves the point out); b(i): the smallest weighted mean distance to
    another cluster; the score is the weighted mean of (b - a) / max(a, b), 0 for a point
    alone in its cluster. With unit weights this is scikit-learn's silhouette_score.
    """
    distances = pairwise_distances(points)
    clusters, index = np.unique(labels, return_inverse=True)
    member = np.zeros((len(points), len(clusters)))
    member[np.arange(len(points)), index] = 1.0
    weighted_members = member * weights[:, None]
    totals = weighted_members.sum(axis=0)
    sums = distances @ weighted_members  # [point, cluster]: sum of w * distance
    own_total = totals[index] - weights
    own = sums[np.arange(len(points)), index]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(own_total > 0, own / np.where(own_total > 0, own_total, 1.0), 0.0)
        means = sums / totals[None, :]
    means[np.arange(len(points)), index] = np.inf
    b = means.min(axis=1)
    denominator = np.maximum(a, b)
    s = np.where((own_total > 0) & (denominator > 0), (b - a) / np.where(
        denominator > 0, denominator, 1.0), 0.0)
    return float(np.sum(weights * s) / np.sum(weights))


def weighted_quantile(values: np.ndarray, quantile: float, weights: np.ndarray | None) -> float:
    """np.quantile, weighted when `weights` are not all 1 (inverted CDF: a value that occurs)."""
    if weights is None or not np.any(weights != 1.0):
        return float(np.quantile(values, quantile))
    return float(np.quantile(values, quantile, method="inverted_cdf", weights=weights))


def _within_quantile(distances: np.ndarray, quantile: float,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Rows whose nearest-centroid distance is at most the `quantile` quantile."""
    nearest = distances.min(axis=1)
    return nearest <= weighted_quantile(nearest, quantile, weights)


class KMeansAnomalyFamily(ModelFamily):
    name: ClassVar[str] = KMEANS_ANOMALY
    metrics: ClassVar[tuple[str, ...]] = FAMILY_METRICS[KMEANS_ANOMALY]
    needs_labels: ClassVar[bool] = False
    flags_anomalies: ClassVar[bool] = True

    def parse_params(self, hp: Hyperparameters, common: CommonParams) -> KMeansParams:
        k_min = hp.integer("k_min", 2, minimum=2, maximum=256)
        k_max = hp.integer("k_max", max(k_min, 8), minimum=2, maximum=256)
        if k_max < k_min:
            raise HyperparameterError(
                f"hyperparameter 'k_max': must be >= k_min ({k_min}), got {k_max}")
        return KMeansParams(
            k_min=k_min,
            k_max=k_max,
            anomaly_quantile=hp.number("anomaly_quantile", 0.995, minimum=0.0, maximum=1.0,
                                       exclusive=True),
            k_tolerance=hp.number("k_tolerance", 0.02, minimum=0.0, maximum=2.0),
            selection_rows=hp.integer("selection_rows", 20_000, minimum=100, maximum=10_000_000),
            silhouette_rows=hp.integer("silhouette_rows", 2_000, minimum=100, maximum=100_000),
            n_init=hp.integer("n_init", 3, minimum=1, maximum=100),
            max_iter=hp.integer("max_iter", 300, minimum=1, maximum=100_000),
        )

    def check_data(self, params: KMeansParams, train: Split, holdout: Split) -> None:
        if len(train) < params.k_max:
            raise DataError(
                f"too little data: {len(train)} training records, fewer than k_max={params.k_max}")
        if len(holdout) < 3:
            raise DataError(
                f"too little data: {len(holdout)} holdout records; silhouette needs at least 3")

    def fit(self, params: KMeansParams, common: CommonParams, train: Split,
            champion_model: bytes | None = None) -> FittedModel:
        # None when every weight is 1: the unweighted path, bit for bit as before weights.
        weights = train.weights if train.weighted else None
        scaler = StandardScaler().fit(train.features, sample_weight=weights)
        points = scaler.transform(train.features)
        rng = np.random.default_rng(common.seed)
        if len(points) > params.selection_rows:
            chosen_rows = np.sort(rng.choice(len(points), params.selection_rows, replace=False))
            sample = points[chosen_rows]
            sample_weights = weights[chosen_rows] if weights is not None else None
        else:
            sample, sample_weights = points, weights
        k_scores: dict[str, float] = {}
        fits: dict[int, KMeans] = {}
        with warnings.catch_warnings():
            # Duplicate points can leave fewer distinct clusters than k; silhouette then judges it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            # Trim first: the anomalies in the data would otherwise claim clusters of their own
            # (and a later anomaly near one of those would pass as normal).
            rough = KMeans(n_clusters=min(params.k_max, len(sample) - 1), n_init=1,
                           max_iter=params.max_iter, random_state=common.seed
                           ).fit(sample, sample_weight=sample_weights)
            inside = _within_quantile(rough.transform(sample), params.anomaly_quantile,
                                      sample_weights)
            trimmed = sample[inside]
            trimmed_weights = sample_weights[inside] if sample_weights is not None else None
            for k in range(params.k_min, min(params.k_max, len(trimmed) - 1) + 1):
                candidate = KMeans(n_clusters=k, n_init=params.n_init, max_iter=params.max_iter,
                                   random_state=common.seed
                                   ).fit(trimmed, sample_weight=trimmed_weights)
                k_scores[str(k)] = safe_silhouette(trimmed, candidate.labels_,
                                                   params.silhouette_rows, common.seed,
                                                   trimmed_weights)
                fits[k] = candidate
            if not fits:
                raise DataError(f"too little data: {len(trimmed)} training records for k >= "
                                f"{params.k_min}")
            best_score = max(k_scores.values())
            k = min(k for k in fits if k_scores[str(k)] >= best_score - params.k_tolerance)
            chosen = fits[k]
            if sample is points:
                final = chosen
            else:
                keep = _within_quantile(chosen.transform(points), params.anomaly_quantile,
                                        weights)
                final = KMeans(n_clusters=k, init=chosen.cluster_centers_, n_init=1,
                               max_iter=params.max_iter, random_state=common.seed
                               ).fit(points[keep], sample_weight=weights[keep]
                                     if weights is not None else None)
        nearest = final.transform(points).min(axis=1)
        threshold = weighted_quantile(nearest, params.anomaly_quantile, weights)
        pipeline = Pipeline([("scale", scaler), ("kmeans", final)])
        details: dict[str, Any] = {
            "k": k,
            "k_scores": k_scores,
            "anomaly_threshold": threshold,
            "anomaly_quantile": params.anomaly_quantile,
            "train_anomaly_rate": float(np.average(nearest > threshold, weights=weights)),
            "train_weight": float(np.sum(weights)) if weights is not None else len(points),
            "selection_rows": len(sample),
            "trimmed_rows": len(sample) - len(trimmed),
            "inertia": float(final.inertia_),
            "iterations": int(final.n_iter_),
        }
        return FittedModel(
            estimator=pipeline,
            details=details,
            metadata={onnx_metadata.ANOMALY_THRESHOLD: repr(threshold),
                      onnx_metadata.K: str(k)},
            context={"scaler": scaler},
        )

    def library_outputs(self, fitted: FittedModel, features: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        pipeline: Pipeline = fitted.estimator
        return pipeline.predict(features).astype(np.int64), pipeline.transform(features)

    def to_onnx(self, fitted: FittedModel, common: CommonParams, target_opset: dict[str, int]
                ) -> onnx.ModelProto:
        k = int(fitted.details["k"])
        return convert_sklearn(
            fitted.estimator,
            name=common.model_name,
            initial_types=[("input", FloatTensorType([None, len(common.features)]))],
            final_types=[("label", Int64TensorType([None])), ("scores", FloatTensorType([None, k]))],
            target_opset=target_opset,
        )

    def evaluate(self, fitted: FittedModel, params: KMeansParams, common: CommonParams,
                 holdout: Split, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        points = fitted.context["scaler"].transform(holdout.features)
        weights = holdout.weights if holdout.weighted else None
        return {"silhouette": safe_silhouette(points, np.asarray(labels), params.silhouette_rows,
                                              common.seed, weights)}

    def flags(self, scores: np.ndarray, metadata: dict[str, str]) -> np.ndarray | None:
        try:
            threshold = float(metadata[onnx_metadata.ANOMALY_THRESHOLD])
        except (KeyError, ValueError):
            raise ChampionError("a k-means model without a numeric mledge.anomaly_threshold "
                                "cannot be judged on detection") from None
        # The device's rule (mledge_edge.model): nearest-centroid distance above threshold.
        return np.asarray(scores).min(axis=1) > threshold


FAMILY = KMeansAnomalyFamily
