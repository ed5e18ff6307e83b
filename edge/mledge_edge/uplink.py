"""What the device sends upstream, and how much it has sent.

The policy (job document `uplink`, pipeline.toml) is the shared contract's
`UplinkPolicy` (mledge_update.uplink), read leniently with `from_document`.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from mledge_update.uplink import UplinkPolicy


class UplinkDecider:
    """Decides per reading whether it is sent; deterministic for a seed."""

    def __init__(self, policy: UplinkPolicy, seed: int | None = None) -> None:
        self.policy = policy
        self._random = random.Random(seed)

    def should_send(self, has_model: bool, anomaly: bool) -> tuple[bool, str]:
        if not has_model:
            return self.policy.before_model == "all", "no-model"
        if anomaly and self.policy.anomalies:
            return True, "anomaly"
        if self._random.random() < self.policy.sample_rate:
            return True, "sample"
        return False, "suppressed"


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
