"""The registry of model families, chosen by the `family` hyperparameter.

To add a family: write `trainer/families/<name>.py` with a `ModelFamily` subclass
and add it to `_FAMILIES` below.
"""

from __future__ import annotations

from trainer.errors import UnknownFamilyError
from trainer.families.base import FittedModel, ModelFamily
from trainer.families.classifier import ClassifierFamily
from trainer.families.kmeans_anomaly import KMeansAnomalyFamily

_FAMILIES: dict[str, type[ModelFamily]] = {
    KMeansAnomalyFamily.name: KMeansAnomalyFamily,
    ClassifierFamily.name: ClassifierFamily,
}


def family_names() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def get_family(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]()
    except KeyError:
        raise UnknownFamilyError(
            f"unknown family {name!r} (known: {', '.join(family_names())})"
        ) from None


__all__ = ["FittedModel", "ModelFamily", "family_names", "get_family"]
