"""Why a reading was sent upstream: the record fields every uplinked reading carries.

The device's uplink policy (job document `uplink`) does not send every reading once a
model serves: it sends every flagged reading and a random `sample_rate` fraction of the
rest. Training on what arrives as if it were the whole stream would over-represent
flagged readings many times over (the trainer would learn the faults as normal), so each
telemetry record says why it was sent and with what probability a reading like it was
sent (`inclusion_p`); the trainer weighs it by `1 / inclusion_p` (docs/training.md).

Shared by the device (which writes the fields), ingest (which validates them) and, as
the raw-record format, the trainer.
"""

from __future__ import annotations

import math
from typing import Any

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
