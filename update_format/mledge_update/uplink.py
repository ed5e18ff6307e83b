"""What a device sends upstream: the `uplink` policy of pipeline.toml and the job document.

Before a model is installed, `before_model` = "all" sends every reading (the cloud
needs data to train on), "none" sends nothing. With a model: every anomaly (when
`anomalies` is true), a random `sample_rate` fraction of the other readings (drift
data), and a summary every `summary_interval_seconds`. One set of defaults: the
cloud fills in what pipeline.toml leaves out, a device what a document leaves out.

Why a reading was sent: training on what arrives as if it were the whole stream would
over-represent flagged readings many times over (the trainer would learn the faults as
normal), so each telemetry record says why it was sent (`reason`) and with what
probability a reading like it was sent (`inclusion_p`); the trainer weighs it by
`1 / inclusion_p` (docs/training.md). The device writes these fields, ingest validates
them, the trainer reads them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

BEFORE_MODEL_CHOICES = ("all", "none")


@dataclass(frozen=True)
class UplinkPolicy:
    before_model: str = "all"
    anomalies: bool = True
    sample_rate: float = 0.02
    summary_interval_seconds: float = 60

    def to_document(self) -> dict[str, Any]:
        """The job document's `uplink` object."""
        return asdict(self)

    @classmethod
    def from_document(cls, value: dict[str, Any] | None) -> UplinkPolicy:
        """A device's reading of a document's `uplink`: lenient, values out of range clamped.

        A device must keep running on whatever a (possibly newer) cloud sends, so an
        unknown `before_model` falls back to "all" and the numbers are clamped.
        """
        defaults = cls()
        merged = {**asdict(defaults), **(value or {})}
        before = str(merged["before_model"])
        if before not in BEFORE_MODEL_CHOICES:
            before = defaults.before_model
        rate = min(1.0, max(0.0, float(merged["sample_rate"])))
        interval = max(1.0, float(merged["summary_interval_seconds"]))
        return cls(before, bool(merged["anomalies"]), rate, interval)


REASON_FIELD = "reason"
INCLUSION_FIELD = "inclusion_p"

NO_MODEL = "no-model"
"""No model installed yet: every reading is sent (inclusion probability 1)."""
SAMPLE = "sample"
"""In the random sample of readings the model did not flag (probability `sample_rate`)."""
FLAGGED = "flagged"
"""Flagged by the model: sent whenever flagged readings are sent (probability 1)."""
SUMMARY = "summary"
"""A periodic summary: not a reading, never training data."""

READING_REASONS = frozenset({NO_MODEL, SAMPLE, FLAGGED})


class UplinkFieldError(ValueError):
    """A record's reason or inclusion probability is unusable; `str()` says which."""


def check_uplink_fields(record: dict[str, Any]) -> tuple[str, float] | None:
    """(reason, inclusion_p) of a telemetry record, None when it carries neither.

    A record from an agent that predates these fields carries neither and is weighed 1.
    One field without the other, an unknown reason, or a probability outside (0, 1]
    raises UplinkFieldError: a wrong weight would bias every later training.
    """
    has_reason, has_p = REASON_FIELD in record, INCLUSION_FIELD in record
    if not has_reason and not has_p:
        return None
    if not has_reason or not has_p:
        missing = REASON_FIELD if not has_reason else INCLUSION_FIELD
        raise UplinkFieldError(f"{missing}: missing ({REASON_FIELD} and {INCLUSION_FIELD} "
                               "come together)")
    reason, p = record[REASON_FIELD], record[INCLUSION_FIELD]
    if reason not in READING_REASONS:
        allowed = ", ".join(sorted(READING_REASONS))
        raise UplinkFieldError(f"{REASON_FIELD}: must be one of {allowed}, got {reason!r}"[:200])
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) \
            or not 0.0 < p <= 1.0:
        raise UplinkFieldError(f"{INCLUSION_FIELD}: must be a probability in (0, 1], "
                               f"got {p!r}"[:200])
    if reason != SAMPLE and p != 1:
        raise UplinkFieldError(f"{INCLUSION_FIELD}: a {reason!r} reading is always sent "
                               f"(1), got {p!r}")
    return str(reason), float(p)
