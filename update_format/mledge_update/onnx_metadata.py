"""The ONNX metadata keys (`metadata_props`) the trainer writes and the device reads."""

from __future__ import annotations

MODEL = "mledge.model"  # the model's name
VERSION = "mledge.version"  # the registry version, a decimal integer
FAMILY = "mledge.family"  # one of families.FAMILIES
FEATURES = "mledge.features"  # JSON list of the input's feature names, in column order
ANOMALY_THRESHOLD = "mledge.anomaly_threshold"  # kmeans_anomaly: distance above which a row is one
K = "mledge.k"  # kmeans_anomaly: the number of clusters
CLASSES = "mledge.classes"  # classifier, cnn: JSON list of the class labels
CNN_ARCHITECTURE = "mledge.cnn.architecture"  # cnn: JSON of the shapes a warm start must match
