"""The metric gate: does a trained challenger deserve to reach the fleet?

A pure function of the model's config and the training job's ``metrics.json``.
Every rule yields one readable reason, whether it passes or fails, e.g.
``silhouette 0.4100 ≥ threshold 0.3000: pass``; the decision approves only when
every rule passes. The rules:

1. ``metrics``: metrics.json is for this model's family and has a finite
   challenger score for the configured metric;
2. ``threshold``: challenger[metric] ≥ threshold;
3. ``improvement``: when a champion was scored on the same holdout
   (``champion`` not null), challenger ≥ champion + min_improvement. When none
   was scored, this is the model's first version (threshold only) - unless the
   caller says a model is in production, in which case a challenger that was
   never compared to it is rejected;
4. ``parity``: the ONNX export reproduces the library model (``parity.passed``);
5. ``min_train_records``: it was trained on at least that many records
   (``data.train``);
6. ``detection`` (anomaly families only): metrics.json carries the detection of the
   readings with a verdict (trainer.detection). When there are confirmed faults and a
   champion was scored on them, the challenger must flag at least the champion's
   share minus ``detection_tolerance``: a clustering score alone never approves a
   model that has stopped flagging what its champion flagged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mledge_update.families import ANOMALY_FAMILIES

from chalicelib.config import ModelConfig
from chalicelib.untrusted import shown

# Scores are floats: 0.95 + 0.005 is 0.9550000000000001, and a challenger scoring
# 0.955 must not fail "0.9550 < 0.9550". Comparisons allow this much rounding.
_ROUNDING = 1e-9


@dataclass(frozen=True)
class GateCheck:
    rule: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateDecision:
    approved: bool
    reasons: list[str]
    metric: str
    challenger: float | None
    champion: float | None
    threshold: float
    min_improvement: float
    first_model: bool
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What the registry stores as a version's `gate`."""
        return {
            "approved": self.approved,
            "decision": "APPROVED" if self.approved else "REJECTED",
            "reasons": list(self.reasons),
            "metric": self.metric,
            "challenger": self.challenger,
            "champion": self.champion,
            "threshold": self.threshold,
            "min_improvement": self.min_improvement,
            "first_model": self.first_model,
            "checks": [asdict(c) for c in self.checks],
        }

    def summary(self) -> str:
        failed = [c.reason for c in self.checks if not c.passed]
        if self.approved:
            return f"approved: {self.metric} {_num(self.challenger)}"
        return "rejected: " + "; ".join(failed)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _score(section: Any, metric: str) -> float | None:
    """A finite float score from a metrics.json section, else None."""
    if not isinstance(section, dict):
        return None
    return _finite(section.get(metric))


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (huge integers included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return value if math.isfinite(value) else None


def _rate(section: Any, key: str = "fault_detection") -> float | None:
    return _score(section, key)


def _detection_check(detection: Any, tolerance: float) -> GateCheck:
    if not isinstance(detection, dict) or not isinstance(detection.get("challenger"), dict):
        return GateCheck("detection", False,
                         "metrics.json has no detection result (a trainer that does not "
                         "score confirmed faults): FAIL")
    faults = detection.get("labelled_faults")
    challenger = _rate(detection["challenger"])
    champion = _rate(detection.get("champion"))
    if not isinstance(faults, int) or isinstance(faults, bool) or faults <= 0 \
            or challenger is None:
        return GateCheck("detection", True,
                         "no confirmed faults labelled yet (mledge label, fault_rules): "
                         "nothing to compare: pass")
    if champion is None:
        return GateCheck("detection", True,
                         f"flags {challenger:.1%} of {faults} confirmed faults; no champion "
                         f"scored on them: pass")
    needed = champion - tolerance
    ok = challenger >= needed - _ROUNDING
    sign = "≥" if ok else "<"
    return GateCheck("detection", ok,
                     f"flags {challenger:.1%} of {faults} confirmed faults {sign} champion "
                     f"{champion:.1%} - detection_tolerance {tolerance:.1%}: {_verdict(ok)}")


def _verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def evaluate(model_config: ModelConfig, metrics: dict[str, Any], *,
             champion_in_production: bool = False, champion_version: int | None = None,
             released_version: int | None = None) -> GateDecision:
    """Decide on one challenger. `champion_in_production`: the model has a current release.

    `champion_version` (the release the challenger was scored against, from its lineage)
    and `released_version` (the release now): when both are known and differ, the fleet
    moved on while the challenger trained (e.g. a version approved during its training was
    released) and it was never compared with what the fleet runs: the improvement rule fails.
    """
    metric = model_config.metric
    threshold = float(model_config.threshold)
    min_improvement = float(model_config.min_improvement)
    checks: list[GateCheck] = []

    # 1. the metrics are about this model and readable
    family = metrics.get("family")
    challenger = _score(metrics.get("challenger"), metric)
    if family is not None and family != model_config.family:
        checks.append(GateCheck("metrics", False,
                                f"metrics.json is for family {shown(family)}, the model is "
                                f"{model_config.family!r}: FAIL"))
    elif challenger is None:
        raw = (metrics.get("challenger") or {}).get(metric) \
            if isinstance(metrics.get("challenger"), dict) else None
        what = "missing" if raw is None else f"not a finite number ({shown(raw)})"
        checks.append(GateCheck("metrics", False,
                                f"challenger {metric} is {what} in metrics.json: FAIL"))
    else:
        checks.append(GateCheck("metrics", True,
                                f"metrics.json has challenger {metric} for family "
                                f"{model_config.family}: pass"))

    # 2. threshold
    if challenger is not None:
        ok = challenger >= threshold - _ROUNDING
        sign = "≥" if ok else "<"
        checks.append(GateCheck("threshold", ok, f"{metric} {_num(challenger)} {sign} threshold "
                                                 f"{_num(threshold)}: {_verdict(ok)}"))

    # 3. improvement over the champion, on the same holdout
    champion_section = metrics.get("champion")
    champion = _score(champion_section, metric)
    first_model = champion_section is None
    if champion_section is None:
        if champion_in_production:
            checks.append(GateCheck(
                "improvement", False,
                "a model is in production but metrics.json has no champion score: the "
                "challenger was never compared to it: FAIL"))
        else:
            checks.append(GateCheck(
                "improvement", True,
                "no champion scored (first model of this model): threshold only: pass"))
    elif champion is None:
        checks.append(GateCheck("improvement", False,
                                f"champion {metric} is missing or not a finite number in "
                                f"metrics.json: FAIL"))
    elif (champion_version is not None and released_version is not None
          and champion_version != released_version):
        checks.append(GateCheck(
            "improvement", False,
            f"champion scored was v{champion_version}, but the fleet now runs "
            f"v{released_version}: the challenger was never compared to it: FAIL"))
    elif challenger is not None:
        needed = champion + min_improvement
        ok = challenger >= needed - _ROUNDING
        sign = "≥" if ok else "<"
        checks.append(GateCheck(
            "improvement", ok,
            f"{metric} {_num(challenger)} {sign} champion {_num(champion)} + min_improvement "
            f"{_num(min_improvement)} = {_num(needed)} (same holdout): {_verdict(ok)}"))

    # 4. ONNX parity
    parity = metrics.get("parity")
    if not isinstance(parity, dict) or not isinstance(parity.get("passed"), bool):
        checks.append(GateCheck("parity", False, "metrics.json has no parity result: FAIL"))
    else:
        ok = parity["passed"]
        details = []
        max_abs_diff = _finite(parity.get("max_abs_diff"))
        if max_abs_diff is not None:
            details.append(f"max_abs_diff {max_abs_diff:.3g}")
        label_agreement = _finite(parity.get("label_agreement"))
        if label_agreement is not None:
            details.append(f"label_agreement {label_agreement:.4f}")
        rows = parity.get("rows")
        if type(rows) is int and 0 <= rows < 10**15:
            details.append(f"{rows} rows")
        extra = f" ({', '.join(details)})" if details else ""
        checks.append(GateCheck("parity", ok,
                                f"ONNX parity {'passed' if ok else 'failed'}{extra}: "
                                f"{_verdict(ok)}"))

    # 5. enough training records
    data = metrics.get("data")
    train = data.get("train") if isinstance(data, dict) else None
    minimum = model_config.min_train_records
    if isinstance(train, bool) or not isinstance(train, int):
        checks.append(GateCheck("min_train_records", False,
                                "metrics.json has no data.train record count: FAIL"))
    else:
        ok = train >= minimum
        sign = "≥" if ok else "<"
        checks.append(GateCheck("min_train_records", ok,
                                f"trained on {train} records {sign} min_train_records {minimum}: "
                                f"{_verdict(ok)}"))

    # 6. detection of confirmed faults
    if model_config.family in ANOMALY_FAMILIES:
        checks.append(_detection_check(metrics.get("detection"),
                                       float(model_config.detection_tolerance)))

    approved = all(c.passed for c in checks)
    return GateDecision(
        approved=approved,
        reasons=[c.reason for c in checks],
        metric=metric,
        challenger=challenger,
        champion=champion,
        threshold=threshold,
        min_improvement=min_improvement,
        first_model=first_model,
        checks=checks,
    )
