"""The registry of model families, chosen by the `family` hyperparameter.

To add a family: write `trainer/families/<name>.py` with a `ModelFamily` subclass
and add it to `_FAMILIES` below (or to `_OPTIONAL_FAMILIES` when it needs an optional
dependency: it is then imported only when a run asks for it).
"""

from __future__ import annotations

import importlib

from trainer.errors import FamilyUnavailableError, UnknownFamilyError
from trainer.families.base import FittedModel, ModelFamily
from trainer.families.classifier import ClassifierFamily
from trainer.families.kmeans_anomaly import KMeansAnomalyFamily

_FAMILIES: dict[str, type[ModelFamily]] = {
    KMeansAnomalyFamily.name: KMeansAnomalyFamily,
    ClassifierFamily.name: ClassifierFamily,
}
# name -> (module, class, the extra that installs its dependencies). PyTorch is large,
# so k-means and classifier runs neither need it installed nor pay for importing it.
_OPTIONAL_FAMILIES: dict[str, tuple[str, str, str]] = {
    "cnn": ("trainer.families.cnn", "CnnFamily", "cnn"),
}


def family_names() -> tuple[str, ...]:
    return tuple(sorted((*_FAMILIES, *_OPTIONAL_FAMILIES)))


def get_family(name: str) -> ModelFamily:
    if name in _FAMILIES:
        return _FAMILIES[name]()
    if name in _OPTIONAL_FAMILIES:
        module_name, class_name, extra = _OPTIONAL_FAMILIES[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FamilyUnavailableError(
                f"family {name!r} needs {exc.name or 'a missing package'}, which this image "
                f"lacks: install mledge-trainer[{extra}]") from None
        family: ModelFamily = getattr(module, class_name)()
        return family
    raise UnknownFamilyError(
        f"unknown family {name!r} (known: {', '.join(family_names())})"
    )


__all__ = ["FittedModel", "ModelFamily", "family_names", "get_family"]
