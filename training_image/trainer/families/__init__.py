"""The model families, chosen by the `family` hyperparameter.

The list of families is the shared contract's (mledge_update.families); each one's
trainer is the module of the same name here, `trainer/families/<name>.py`, which
names its `ModelFamily` subclass `FAMILY`. Adding a family: add it to that list
and write its module.
"""

from __future__ import annotations

import importlib

from mledge_update.families import FAMILIES

from trainer.errors import FamilyUnavailableError, UnknownFamilyError
from trainer.families.base import FittedModel, ModelFamily


def family_names() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def family_class(name: str) -> type[ModelFamily]:
    """The `ModelFamily` subclass of a family the contract lists."""
    if name not in FAMILIES:
        raise UnknownFamilyError(
            f"unknown family {name!r} (known: {', '.join(family_names())})"
        )
    try:
        module = importlib.import_module(f"trainer.families.{name}")
    except ImportError as exc:
        # A family with an optional dependency (the cnn needs PyTorch, the extra `cnn`):
        # imported only when a run asks for it, so other images need not install it.
        raise FamilyUnavailableError(
            f"family {name!r} needs {exc.name or 'a missing package'}, which this image "
            f"lacks: install mledge-trainer[{name}]") from None
    cls: type[ModelFamily] = module.FAMILY
    return cls


def get_family(name: str) -> ModelFamily:
    return family_class(name)()


__all__ = ["FittedModel", "ModelFamily", "family_class", "family_names", "get_family"]
