"""What a demo run records, typed: the options, what the observer sees (`Snapshot`), and
`DemoRecord`, the part of a run the report reads (so the report never imports the run loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from chalicelib.config import ModelConfig
from chalicelib.registry import Status, VersionRecord
from mledge_devstack.stack import PROJECT_DIR

DEMO_PIPELINE_CONFIG = Path(__file__).with_name("pipeline.toml")
DEFAULT_OUTPUT = PROJECT_DIR / "demo-output"
DEFAULT_WORKDIR = PROJECT_DIR / ".devstack" / "demo"
SCENARIO_MODEL = {"anomaly": "vibration-anomaly", "digits": "digits"}
DECIDED = {Status.REJECTED, Status.APPROVED, Status.RELEASED, Status.SUPERSEDED,
           Status.ROLLED_BACK, Status.FAILED}
RELEASED = {Status.RELEASED, Status.SUPERSEDED, Status.ROLLED_BACK}


class DemoError(Exception):
    """The story did not reach its next step (a timeout, a failed training, a dead agent)."""


class DemoInterruptedError(Exception):
    """Ctrl-C or SIGTERM."""


@dataclass
class DemoOptions:
    scenario: str = "anomaly"
    devices: int = 10
    fleet_rate: float = 30.0  # readings per second across the fleet
    output: Path = DEFAULT_OUTPUT
    workdir: Path = DEFAULT_WORKDIR
    pipeline_config: Path = DEMO_PIPELINE_CONFIG
    timeout: float = 900.0  # the whole story
    stage_timeout: float = 300.0  # one step of it
    steady_seconds: float = 10.0  # the first model serves this long before the shift
    fault_rate: float = 0.05  # injected in the last phase
    fault_readings_per_device: int = 80
    live: bool | None = None  # None: a live display when stdout is a terminal
    stream: Any = None

    def validate(self) -> DemoOptions:
        if self.scenario not in SCENARIO_MODEL:
            raise DemoError(f"unknown scenario {self.scenario!r} (anomaly | digits)")
        if not 1 <= self.devices <= 200:
            raise DemoError(f"--devices must be within 1..200, got {self.devices}")
        if self.fleet_rate <= 0:
            raise DemoError("--fleet-rate must be > 0")
        return self


@dataclass
class Snapshot:
    t: float  # seconds since the demo started
    versions: dict[int, VersionRecord]
    new_records: int
    devices: dict[str, dict[str, Any]]

    def serving(self) -> dict[str, int | None]:
        return {name: stats.get("serving_version") for name, stats in self.devices.items()}

    def count_serving(self, version: int) -> int:
        return sum(1 for v in self.serving().values() if v == version)

    def training(self) -> VersionRecord | None:
        for record in self.versions.values():
            if record.status == Status.TRAINING:
                return record
        return None

    def in_flight(self) -> bool:
        """A training runs, or an approved version waits for its release (one whose
        release was skipped or failed waits for nothing)."""
        return any(r.status is Status.TRAINING or (r.status is Status.APPROVED
                                                   and not _release_ended(r))
                   for r in self.versions.values())

    def fault_ids(self) -> list[str]:
        """Ids of the fault readings the fleet sent (the simulator's ground truth)."""
        return [i for stats in self.devices.values() for i in stats.get("demo_fault_ids", [])]

    def released(self) -> list[VersionRecord]:
        return [r for r in self.versions.values() if r.status in RELEASED]

    def fleet_uplink(self) -> tuple[int, int, int]:
        """(readings, messages, bytes) the fleet has read and sent so far."""
        readings = messages = sent = 0
        for stats in self.devices.values():
            readings += int(stats.get("readings", 0))
            for phase in (stats.get("uplink") or {}).values():
                messages += int(phase.get("messages", 0))
                sent += int(phase.get("bytes", 0))
        return readings, messages, sent


def _release_ended(record: VersionRecord) -> bool:
    last = str((record.history or [{}])[-1].get("reason") or "")
    return last.startswith(("release skipped", "release failed"))


def iso_to_epoch(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def decided_at(record: VersionRecord) -> float | None:
    for entry in record.history:
        if entry.get("to") in ("REJECTED", "APPROVED", "FAILED"):
            return iso_to_epoch(entry.get("at"))
    return None


def failing_reasons(record: VersionRecord) -> list[str]:
    gate = record.gate or {}
    failed = [c.get("reason", "") for c in gate.get("checks", []) if not c.get("passed")]
    return failed or list(gate.get("reasons", []))


class DemoRecord(Protocol):
    """The record of one run that `report` turns into the summary."""

    options: DemoOptions
    model: ModelConfig
    model_name: str
    started: float  # epoch seconds
    stages: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    releases: list[dict[str, Any]]
    marks: dict[str, float]
    labels: dict[str, Any]  # what the demo's operator labelled (anomaly story)

    def elapsed(self) -> float: ...

    def rel(self, epoch: float | None) -> float | None: ...
