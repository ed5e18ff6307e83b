"""Hyperparameters as SageMaker passes them: a JSON object of strings, parsed with clear errors.

Every value arrives as a string (`"8"`, `"0.995"`, `"[\"rms\", \"peak\"]"`). The
SageMaker Python SDK JSON-encodes string values once more (`"\"mlp\""`); such
doubly quoted values are unwrapped. Numbers and booleans written by hand are
accepted and read as their string form; anything else is an error. Every error
names the hyperparameter and says what was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import HyperparameterError

LABEL_MODES = ("none", "optional", "required")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Keys a SageMaker framework estimator may add; they are not ours to validate.
IGNORED_PREFIXES = ("sagemaker_",)

_MISSING: Any = object()


def _as_string(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if not isinstance(value, str):
        raise HyperparameterError(
            f"hyperparameter {name!r}: must be a string, got {type(value).__name__}"
        )
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            unwrapped = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(unwrapped, str):
            return unwrapped
    return value


class Hyperparameters:
    """Typed, validated reads of the string hyperparameters; tracks which keys were read."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._values = {str(k): _as_string(str(k), v) for k, v in raw.items()}
        self._read: set[str] = set()

    @classmethod
    def load(cls, path: Path) -> Hyperparameters:
        if not path.is_file():
            raise HyperparameterError(f"hyperparameters file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HyperparameterError(f"hyperparameters file is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise HyperparameterError("hyperparameters file must hold a JSON object")
        return cls(raw)

    def _get(self, name: str, default: Any) -> str | None:
        self._read.add(name)
        value = self._values.get(name)
        if value is None or value.strip() == "":
            if default is _MISSING:
                raise HyperparameterError(f"hyperparameter {name!r} is required")
            return None
        return value.strip()

    def string(self, name: str, default: Any = _MISSING,
               choices: Iterable[str] | None = None) -> str:
        value = self._get(name, default)
        if value is None:
            return default
        if choices is not None:
            allowed = tuple(choices)
            if value not in allowed:
                raise HyperparameterError(
                    f"hyperparameter {name!r}: must be one of {', '.join(allowed)}, got {value!r}"
                )
        return value

    def integer(self, name: str, default: Any = _MISSING, *,
                minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(name, default)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            # "8.0" is what a float-typed config value stringifies to; accept whole floats.
            try:
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if not (math.isfinite(as_float) and as_float.is_integer()):
                raise HyperparameterError(
                    f"hyperparameter {name!r}: must be a whole number, got {value!r}"
                ) from None
            number = int(as_float)
        _check_range(name, number, minimum, maximum)
        return number

    def number(self, name: str, default: Any = _MISSING, *,
               minimum: float | None = None, maximum: float | None = None,
               exclusive: bool = False) -> float:
        value = self._get(name, default)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise HyperparameterError(
                f"hyperparameter {name!r}: must be a number, got {value!r}"
            ) from None
        if not math.isfinite(number):
            raise HyperparameterError(f"hyperparameter {name!r}: must be finite, got {value!r}")
        if exclusive:
            if minimum is not None and number <= minimum:
                raise HyperparameterError(
                    f"hyperparameter {name!r}: must be greater than {minimum}, got {value!r}")
            if maximum is not None and number >= maximum:
                raise HyperparameterError(
                    f"hyperparameter {name!r}: must be less than {maximum}, got {value!r}")
        else:
            _check_range(name, number, minimum, maximum)
        return number

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise HyperparameterError(f"hyperparameter {name!r}: must be true or false, got {value!r}")

    def int_tuple(self, name: str, default: Any = _MISSING, *, minimum: int = 1,
                  maximum: int | None = None, max_items: int = 16) -> tuple[int, ...]:
        """A comma-separated list of whole numbers such as "128,64" (or a JSON list)."""
        value = self._get(name, default)
        if value is None:
            return default
        text = value.strip("[]() ")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or len(parts) > max_items:
            raise HyperparameterError(
                f"hyperparameter {name!r}: must be 1 to {max_items} comma-separated whole "
                f"numbers like '128,64', got {value!r}"
            )
        numbers: list[int] = []
        for part in parts:
            try:
                numbers.append(int(part))
            except ValueError:
                raise HyperparameterError(
                    f"hyperparameter {name!r}: {part!r} is not a whole number (in {value!r})"
                ) from None
            _check_range(name, numbers[-1], minimum, maximum)
        return tuple(numbers)

    def name_list(self, name: str) -> tuple[str, ...]:
        """A JSON list of unique identifiers, e.g. the feature names in schema order."""
        value = self._get(name, _MISSING)
        assert value is not None
        try:
            names = json.loads(value)
        except json.JSONDecodeError:
            raise HyperparameterError(
                f"hyperparameter {name!r}: must be a JSON list of names like "
                f"'[\"rms\", \"peak\"]', got {value[:80]!r}"
            ) from None
        if not (isinstance(names, list) and names
                and all(isinstance(n, str) and FEATURE_NAME.match(n) for n in names)):
            raise HyperparameterError(
                f"hyperparameter {name!r}: must be a non-empty JSON list of identifiers"
            )
        if len(set(names)) != len(names):
            raise HyperparameterError(f"hyperparameter {name!r}: names must be unique")
        return tuple(names)

    def check_all_read(self, family: str) -> None:
        """Fail on keys nobody read: a typo like `k_mx` must not be silently ignored."""
        unknown = sorted(
            k for k in self._values
            if k not in self._read and not k.startswith(IGNORED_PREFIXES)
        )
        if unknown:
            known = ", ".join(sorted(self._read))
            raise HyperparameterError(
                f"unknown hyperparameter(s) for family {family!r}: {', '.join(unknown)} "
                f"(known: {known})"
            )


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise HyperparameterError(f"hyperparameter {name!r}: must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise HyperparameterError(f"hyperparameter {name!r}: must be <= {maximum}, got {number}")


@dataclass(frozen=True)
class CommonParams:
    """The hyperparameters every family shares (docs/training.md)."""

    family: str
    model_name: str
    model_version: int
    metric: str
    features: tuple[str, ...]
    label_mode: str
    holdout_percent: int
    seed: int
    fault_rules: str = ""
    """The raw `fault_rules` JSON (trainer.detection parses it against `features`)."""

    @classmethod
    def parse(cls, hp: Hyperparameters, family: str, metrics: tuple[str, ...]) -> CommonParams:
        model_name = hp.string("model_name")
        if not MODEL_NAME.match(model_name):
            raise HyperparameterError(
                f"hyperparameter 'model_name': must be lowercase letters, digits and '-', "
                f"got {model_name!r}"
            )
        return cls(
            family=family,
            model_name=model_name,
            model_version=hp.integer("model_version", minimum=0),
            metric=hp.string("metric", metrics[0], choices=metrics),
            features=hp.name_list("features"),
            label_mode=hp.string("label_mode", "none", choices=LABEL_MODES),
            holdout_percent=hp.integer("holdout_percent", 20, minimum=1, maximum=90),
            seed=hp.integer("seed", 0, minimum=0, maximum=2**32 - 1),
            fault_rules=hp.string("fault_rules", ""),
        )
