"""The model families and the metrics each one reports: the list cloud, device and trainer share.

Adding a family: add it to `FAMILY_METRICS` here and write its trainer module
`trainer/families/<name>.py` (docs/training.md, "Adding a family"). The pipeline
config accepts it, the gate knows its metrics and the device loads its models
from this list.
"""

from __future__ import annotations

KMEANS_ANOMALY = "kmeans_anomaly"
CLASSIFIER = "classifier"
CNN = "cnn"  # PyTorch; its models follow the classifier's conventions (probabilities in scores)

# family -> the metrics its metrics.json reports (a model's `metric` is one of them)
FAMILY_METRICS: dict[str, tuple[str, ...]] = {
    KMEANS_ANOMALY: ("silhouette",),
    CLASSIFIER: ("accuracy", "macro_f1"),
    CNN: ("accuracy", "macro_f1"),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_METRICS)
# Families whose models flag readings: the gate also judges their detection of faults.
ANOMALY_FAMILIES: frozenset[str] = frozenset({KMEANS_ANOMALY})
# Families whose trainer uses a GPU when it has one. The others never do, so giving them
# one only costs money: the pipeline config refuses it.
GPU_FAMILIES: tuple[str, ...] = (CNN,)
