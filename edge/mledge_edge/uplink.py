"""What the device sends upstream, and how much it has sent.

The policy (job document `uplink`, pipeline.toml) is the shared contract's
`UplinkPolicy` (mledge_update.uplink), read leniently with `from_document`.

Every sent reading says why and with what probability it was sent
(`mledge_update.uplink`): the trainer weighs it by the inverse, so the filter does not
skew what the next model learns.
"""

from __future__ import annotations

import random
import threading
from typing import Any, NamedTuple

from mledge_update.uplink import FLAGGED, NO_MODEL, SAMPLE, UplinkPolicy


class UplinkDecision(NamedTuple):
    """Whether a reading is sent, why, and the probability that a reading like it is sent."""

    send: bool
    reason: str
    inclusion_p: float


class UplinkDecider:
    """Decides per reading whether it is sent; deterministic for a seed."""

    def __init__(self, policy: UplinkPolicy, seed: int | None = None) -> None:
        self.policy = policy
        self._random = random.Random(seed)

    def should_send(self, has_model: bool, anomaly: bool) -> UplinkDecision:
        if not has_model:
            return UplinkDecision(self.policy.before_model == "all", NO_MODEL, 1.0)
        if anomaly and self.policy.anomalies:
            return UplinkDecision(True, FLAGGED, 1.0)
        rate = self.policy.sample_rate
        if self._random.random() < rate:
            return UplinkDecision(True, SAMPLE, rate)
        return UplinkDecision(False, "suppressed", rate)


class UplinkCounter:
    """Messages and bytes (topic + payload, as MQTT PUBLISH carries them) sent,
    split by whether a model was serving at the time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {
            phase: {"messages": 0, "bytes": 0, "telemetry": 0, "summaries": 0}
            for phase in ("before_model", "with_model")
        }
        self.readings = {"before_model": 0, "with_model": 0}

    def reading(self, has_model: bool) -> None:
        with self._lock:
            self.readings["with_model" if has_model else "before_model"] += 1

    def sent(self, has_model: bool, topic: str, payload: bytes, kind: str) -> None:
        phase = "with_model" if has_model else "before_model"
        with self._lock:
            entry = self.counts[phase]
            entry["messages"] += 1
            entry["bytes"] += len(topic.encode()) + len(payload)
            entry["telemetry" if kind == "telemetry" else "summaries"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            result: dict[str, Any] = {}
            for phase, entry in self.counts.items():
                readings = self.readings[phase]
                result[phase] = {
                    **entry,
                    "readings": readings,
                    "bytes_per_reading": round(entry["bytes"] / readings, 2) if readings else None,
                }
            return result
