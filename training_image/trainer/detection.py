"""What an anomaly model is for: flagging faults. Verdicts, fault rules and detection rates.

A flagged reading can get a verdict, "fault" or "normal": from an operator
(`mledge label`, verdict lines in the train channel, trainer.data) or, for a flagged
reading without one, from the model's `fault_rules` hyperparameter (pipeline config),
e.g. `[{"feature": "kurtosis", "above": 6.0}]` (a rule matches when every bound it
names holds; a reading is a fault when any rule matches).

Records with a "fault" verdict never train a model (they are not typical); every
record with a verdict is scored by the challenger and the champion, so the gate can
refuse a challenger that no longer flags the confirmed faults its champion flagged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data import FAULT, NORMAL, Dataset
from trainer.errors import HyperparameterError


@dataclass(frozen=True)
class FaultRule:
    feature: str
    index: int
    above: float | None
    below: float | None

    def matches(self, features: np.ndarray) -> np.ndarray:
        column = features[:, self.index]
        hit = np.ones(len(features), dtype=bool)
        if self.above is not None:
            hit &= column > self.above
        if self.below is not None:
            hit &= column < self.below
        return hit


def parse_fault_rules(text: str | None, features: tuple[str, ...]) -> tuple[FaultRule, ...]:
    """The `fault_rules` hyperparameter: a JSON list of {"feature", "above"?, "below"?}."""
    if not text:
        return ()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raise HyperparameterError(
            "hyperparameter 'fault_rules': must be a JSON list like "
            f"'[{{\"feature\": \"kurtosis\", \"above\": 6}}]', got {text[:80]!r}") from None
    if not isinstance(raw, list):
        raise HyperparameterError("hyperparameter 'fault_rules': must be a JSON list of rules")
    rules = []
    for i, rule in enumerate(raw):
        where = f"hyperparameter 'fault_rules'[{i}]"
        if not isinstance(rule, dict) or set(rule) - {"feature", "above", "below"}:
            raise HyperparameterError(f"{where}: must be an object with feature, above, below")
        feature = rule.get("feature")
        if feature not in features:
            raise HyperparameterError(f"{where}: feature must be one of {', '.join(features)}, "
                                      f"got {feature!r}")
        bounds = {}
        for key in ("above", "below"):
            value = rule.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise HyperparameterError(f"{where}: {key} must be a finite number, got {value!r}")
            bounds[key] = None if value is None else float(value)
        if bounds["above"] is None and bounds["below"] is None:
            raise HyperparameterError(f"{where}: needs above or below")
        rules.append(FaultRule(feature, features.index(feature), bounds["above"],
                               bounds["below"]))
    return tuple(rules)


def resolve_verdicts(data: Dataset, rules: tuple[FaultRule, ...]) -> np.ndarray:
    """Per record: "fault", "normal" or "" (no verdict). Operator verdicts win over rules,
    and rules judge only flagged records (what an operator would be asked about)."""
    verdicts = np.array([data.verdicts.get(i, "") for i in data.ids], dtype=object)
    if rules and len(data):
        hit = np.zeros(len(data), dtype=bool)
        for rule in rules:
            hit |= rule.matches(data.features)
        ruled = hit & data.flagged_array() & (verdicts == "")
        verdicts[ruled] = FAULT
    return verdicts


def detection_rates(flags: np.ndarray, verdicts: np.ndarray) -> dict[str, Any]:
    """Share of confirmed faults flagged, and of confirmed normal readings flagged."""
    faults, normal = verdicts == FAULT, verdicts == NORMAL
    return {
        "fault_detection": float(flags[faults].mean()) if faults.any() else None,
        "false_alarms": float(flags[normal].mean()) if normal.any() else None,
    }
