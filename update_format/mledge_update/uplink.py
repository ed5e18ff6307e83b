"""What a device sends upstream: the `uplink` policy of pipeline.toml and the job document.

Before a model is installed, `before_model` = "all" sends every reading (the cloud
needs data to train on), "none" sends nothing. With a model: every anomaly (when
`anomalies` is true), a random `sample_rate` fraction of the other readings (drift
data), and a summary every `summary_interval_seconds`. One set of defaults: the
cloud fills in what pipeline.toml leaves out, a device what a document leaves out.
"""

from __future__ import annotations

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
