"""`make demo`: the whole loop on one machine, with a simulated fleet of real device agents.

    python -m mledge_devstack.demo [--scenario anomaly|digits] [--devices 10]

Starts the local stack (moto server + IoT bridge, mosquitto with TLS and per-thing ACLs,
the dispatcher running app.py's handlers, the local training backend running the real
trainer), provisions N things with their own certificates, runs one device agent per
thing (`mledge_devstack.demo_device`: `mledge_edge.Agent` + a scenario-controlled
simulator) and plays a story, printing progress; then writes `summary.json` and
`report.html` into the output folder (docs/demo.md explains both).

anomaly (default):
  1. stream   devices have no model and send every reading; after `min_new_records` the
              first training starts and the gate rejects it (too few training records);
  2. learn    more data arrives, the next training passes; the release reaches every
              device as a full model;
  3. steady   devices infer locally and send only anomalies, a 2 % sample and summaries;
  4. shift    the line adds a new high-speed product: the model flags those readings and
              sends them, the retrain learns the new mode, beats the champion on the
              same holdout and ships as a delta; devices patch, verify and hot-swap;
  5. faults   injected faults are flagged on the device; the uplink stays small.
digits: the proof of concept: the operator trains on 10 % of the digits (rejected), then on
70 % (approved, released); devices classify the remaining images locally.

Every process the demo starts (agents, mosquitto, moto, dispatcher, trainers) is
stopped on success, failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from chalicelib import layout
from chalicelib.config import ModelConfig, load_pipeline_config
from chalicelib.registry import Registry, Status, VersionRecord
from chalicelib.state import StateStore
from mledge_devstack.demo_display import Display
from mledge_devstack.procs import ManagedProcess
from mledge_devstack.stack import PROJECT_DIR, LocalStack, ThingCredentials, child_environment

log = logging.getLogger(__name__)

DEMO_PIPELINE_CONFIG = Path(__file__).with_name("demo_pipeline.toml")
DEFAULT_OUTPUT = PROJECT_DIR / "demo-output"
DEFAULT_WORKDIR = PROJECT_DIR / ".devstack" / "demo"
SCENARIO_MODEL = {"anomaly": "vibration-anomaly", "digits": "digits"}
DIGITS_TOTAL = 1797  # scikit-learn's digits data set
POLL_SECONDS = 0.5
DECIDED = {Status.REJECTED, Status.APPROVED, Status.RELEASED, Status.SUPERSEDED,
           Status.ROLLED_BACK, Status.FAILED}
RELEASED = {Status.RELEASED, Status.SUPERSEDED, Status.ROLLED_BACK}

T = TypeVar("T")


class DemoError(Exception):
    """The story did not reach its next step (a timeout, a failed training, a dead agent)."""


class DemoInterrupted(Exception):
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


# ------------------------------------------------------------------------ the fleet


@dataclass
class Device:
    thing: ThingCredentials
    index: int
    state_dir: Path
    process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return self.thing.name

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "stats.json").read_text())
        except (OSError, ValueError):
            return {}


class Fleet:
    """The simulated devices: things, certificates, agent processes, the control file."""

    def __init__(self, stack: LocalStack, options: DemoOptions, model: str) -> None:
        self.stack = stack
        self.options = options
        self.model = model
        self.root = options.workdir / "devices"
        self.control_path = options.workdir / "control.json"
        self.devices: list[Device] = []
        self.control: dict[str, Any] = {}

    def set_control(self, **values: Any) -> None:
        """Atomically rewrite the control file the device simulators read."""
        self.control.update(values)
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.control))
        os.replace(tmp, self.control_path)

    def provision(self, count: int) -> None:
        for index in range(count):
            name = f"demo-{self.model.split('-')[0]}-{index + 1:03d}"
            thing = self.stack.provision_thing(name, model=self.model)
            self.devices.append(Device(thing, index, self.root / name))

    def start(self) -> None:
        rate = self.options.fleet_rate / len(self.devices)
        env = child_environment(PROJECT_DIR, {})
        for device in self.devices:
            device.state_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                sys.executable, "-m", "mledge_devstack.demo_device",
                "--control", str(self.control_path), "--scenario", self.options.scenario,
                "--device-index", str(device.index), "--device-count", str(len(self.devices)),
                "--thing", device.name, "--model", self.model,
                "--endpoint", device.thing.host, "--port", str(device.thing.port),
                "--cert", str(device.thing.cert_path), "--key", str(device.thing.key_path),
                "--ca", str(device.thing.ca_path), "--state-dir", str(device.state_dir),
                "--rate", f"{rate:.4f}", "--stats-interval", "1",
            ]
            device.process = ManagedProcess(
                device.name, argv, log_path=self.options.workdir / "logs" / f"{device.name}.log",
                env=env, cwd=PROJECT_DIR).start()

    def check_alive(self) -> None:
        for device in self.devices:
            if device.process is not None and not device.process.alive():
                code = device.process.popen.returncode if device.process.popen else None
                raise DemoError(f"device agent {device.name} exited with code {code}; "
                                f"log {device.process.log_path}:\n{device.process.log_tail(15)}")

    def stop(self) -> None:
        """SIGTERM every agent at once (each writes its final stats), then wait for all."""
        running = [d.process for d in self.devices if d.process is not None]
        if running:
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                list(pool.map(lambda p: p.stop(timeout=10.0), running))


# ------------------------------------------------------------------------ observing


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


class Demo:
    """One run of a scenario: the stack, the fleet, the observer, the display, the record."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options.validate()
        self.model_name = SCENARIO_MODEL[options.scenario]
        self.config = load_pipeline_config(options.pipeline_config)
        self.model: ModelConfig = self.config.model(self.model_name)
        self.display = Display(options.stream, live=options.live)
        self.started = time.time()
        self.deadline = time.monotonic() + options.timeout
        self.stack: LocalStack | None = None
        self.fleet: Fleet | None = None
        self.registry: Registry | None = None
        self.state: StateStore | None = None
        self.stage_name = "starting"
        self.stage_text = "starting the local stack"
        self.stages: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.releases: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}
        self.labels: dict[str, Any] = {}
        self._seen_status: dict[int | str, str] = {}
        self._last: Snapshot | None = None
        self._last_sample = -1.0

    # ------------------------------------------------------------------ helpers
    def elapsed(self) -> float:
        return time.time() - self.started

    def rel(self, epoch: float | None) -> float | None:
        return None if epoch is None else round(epoch - self.started, 2)

    def stage(self, name: str, text: str) -> None:
        now = round(self.elapsed(), 2)
        if self.stages:
            self.stages[-1]["ended_s"] = now
        self.stages.append({"name": name, "text": text, "started_s": now, "ended_s": None})
        self.stage_name, self.stage_text = name, text
        self.display.event(self.elapsed(), self.display.bold(f"▶ {name}: {text}"))

    def event(self, text: str) -> None:
        self.display.event(self.elapsed(), text)

    def snapshot(self) -> Snapshot:
        assert self.registry is not None and self.state is not None and self.fleet is not None
        versions = {r.version: r for r in self.registry.list_versions(self.model_name)}
        snap = Snapshot(
            t=self.elapsed(), versions=versions,
            new_records=self.state.new_records(self.model_name),
            devices={d.name: d.stats() for d in self.fleet.devices},
        )
        self._report_changes(snap)
        if snap.t - self._last_sample >= 1.0:
            self._last_sample = snap.t
            readings, messages, sent = snap.fleet_uplink()
            serving: dict[str, int] = {}
            for version in snap.serving().values():
                key = str(version or 0)
                serving[key] = serving.get(key, 0) + 1
            self.timeline.append({"t": round(snap.t, 2), "readings": readings,
                                  "messages": messages, "bytes": sent, "serving": serving,
                                  "new_records": snap.new_records, "stage": self.stage_name})
        self._last = snap
        return snap

    def _report_changes(self, snap: Snapshot) -> None:
        """Print each model version's status changes as they happen."""
        metric = self.model.metric
        for version, record in sorted(snap.versions.items()):
            status = str(record.status)
            if self._seen_status.get(version) == status:
                continue
            self._seen_status[version] = status
            d = self.display
            if record.status == Status.TRAINING:
                lineage = record.lineage or {}
                dataset = lineage.get("dataset") or {}
                self.event(f"  cloud: v{version} training on {dataset.get('records', '?')} records "
                           f"({lineage.get('trigger', 'trigger')}; "
                           f"{lineage.get('new_records', '?')} new)")
            elif record.status == Status.REJECTED:
                self.event(d.bad(f"  gate: v{version} REJECTED") + " - "
                           + "; ".join(failing_reasons(record)))
            elif record.status in (Status.APPROVED, Status.RELEASED) and \
                    f"approved-{version}" not in self._seen_status:
                self._seen_status[f"approved-{version}"] = "shown"
                gate = record.gate or {}
                champion = gate.get("champion")
                vs = f" vs champion {champion:.3f}" if isinstance(champion, float) else ""
                score = gate.get("challenger")
                shown = f"{score:.3f}" if isinstance(score, float) else "?"
                self.event(d.good(f"  gate: v{version} APPROVED") +
                           f" - {metric} {shown}{vs} (threshold {self.model.threshold}, "
                           f"min improvement {self.model.min_improvement})")
            if record.status == Status.RELEASED:
                self.event(f"  release: v{version} packaged, IoT job "
                           f"{(record.release or {}).get('job_id')} created")
            if record.status == Status.FAILED:
                self.event(d.bad(f"  training v{version} FAILED: {record.failure_reason}"))

    def wait_for(self, what: str, done: Callable[[Snapshot], T | None], *,
                 progress: Callable[[Snapshot], tuple[float | None, str]],
                 timeout: float | None = None) -> T:
        """Poll until `done` returns a value; show progress; fail on a dead agent or timeout."""
        limit = min(self.deadline, time.monotonic() + (timeout or self.options.stage_timeout))
        while True:
            assert self.fleet is not None
            self.fleet.check_alive()
            snap = self.snapshot()
            for record in snap.versions.values():
                if record.status == Status.FAILED:
                    raise DemoError(f"training v{record.version} failed: {record.failure_reason}")
            result = done(snap)
            if result is not None and result is not False:
                return result
            fraction, detail = progress(snap)
            self.display.status([f"{self.stage_name}: {what}", detail, *self.fleet_lines(snap)],
                                fraction, snap.t)
            if time.monotonic() > limit:
                raise DemoError(f"timed out waiting for: {what} (stage {self.stage_name}); "
                                f"{detail}; logs in {self.options.workdir / 'logs'} and "
                                f"{self.options.workdir / 'stack' / 'logs'}")
            time.sleep(POLL_SECONDS)

    def fleet_lines(self, snap: Snapshot) -> list[str]:
        readings, messages, sent = snap.fleet_uplink()
        serving: dict[str, int] = {}
        for version in snap.serving().values():
            key = f"v{version}" if version else "no model"
            serving[key] = serving.get(key, 0) + 1
        online = sum(1 for s in snap.devices.values() if s.get("connected"))
        models = ", ".join(f"{k} x{n}" for k, n in sorted(serving.items()))
        cloud = ", ".join(f"v{v} {r.status}" for v, r in sorted(snap.versions.items())) or "no model yet"
        return [f"fleet: {online}/{len(snap.devices)} online · {models} · {readings:,} readings · "
                f"sent {messages:,} msgs / {sent / 1024:,.0f} KiB",
                f"cloud: {cloud} · new records since last training {snap.new_records:,}"]

    def data_progress(self, snap: Snapshot) -> tuple[float | None, str]:
        training = snap.training()
        if training is not None:
            return None, f"training v{training.version} (local backend: the real trainer)"
        need = self.model.min_new_records
        return (snap.new_records / need,
                f"{snap.new_records:,}/{need:,} new records until the next training")

    def rollout_progress(self, version_of: Callable[[Snapshot], int | None]
                         ) -> Callable[[Snapshot], tuple[float | None, str]]:
        def progress(snap: Snapshot) -> tuple[float | None, str]:
            version = version_of(snap)
            if version is None:
                return self.data_progress(snap)
            on = snap.count_serving(version)
            return on / len(snap.devices), f"{on}/{len(snap.devices)} devices serve v{version}"
        return progress

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> dict[str, Any]:
        error: BaseException | None = None
        summary: dict[str, Any] = {}
        try:
            self._setup()
            if self.options.scenario == "anomaly":
                self._anomaly()
            else:
                self._digits()
        except BaseException as exc:
            error = exc
        finally:
            summary = self._teardown(error)
        if error is not None:
            raise error
        return summary

    def _setup(self) -> None:
        options = self.options
        d = self.display
        d.write(d.bold(f"MLEdgeDeploy demo: {options.scenario}, {options.devices} devices, "
                       f"{options.fleet_rate:g} readings/s across the fleet"))
        for sub in ("devices", "logs", "stack"):
            shutil.rmtree(options.workdir / sub, ignore_errors=True)
        options.workdir.mkdir(parents=True, exist_ok=True)
        self.stage("setup", "local stack (moto + IoT bridge, mosquitto TLS, dispatcher)")
        self.stack = LocalStack(options.workdir / "stack", pipeline_config=options.pipeline_config)
        self.stack.start()
        clients, settings = self.stack.clients, self.stack.settings
        self.registry = Registry(settings.registry_table, clients.dynamodb)
        self.state = StateStore(settings.state_table, clients.dynamodb)
        self.event(f"  stack up: moto {settings.endpoint_url}, mosquitto localhost:"
                   f"{self.stack.mqtt_port} (TLS, client certificates, per-thing ACL)")
        self.fleet = Fleet(self.stack, options, self.model_name)
        self.fleet.set_control(phase="stream" if options.scenario == "anomaly" else "stream-10",
                               regime="normal", fault_rate=0.0,
                               digits_limit=int(DIGITS_TOTAL * 0.10))
        self.fleet.provision(options.devices)
        self.event(f"  provisioned {options.devices} things in {self.model.thing_group}, "
                   "each with its own X.509 certificate")
        self.fleet.start()
        self.wait_for("device agents connecting",
                      lambda s: all(st.get("connected") for st in s.devices.values()) or None,
                      progress=lambda s: (sum(1 for st in s.devices.values() if st.get("connected"))
                                          / len(s.devices), "agents connected over MQTT/TLS"),
                      timeout=120)
        self.marks["fleet_online"] = self.elapsed()

    def _teardown(self, error: BaseException | None) -> dict[str, Any]:
        d = self.display
        d.finish()
        if error is not None:
            reason = ("interrupted" if isinstance(error, KeyboardInterrupt | DemoInterrupted)
                      else f"{type(error).__name__}: {error}")
            d.write(d.bad(f"demo stopped: {reason}"))
        d.write(d.dim("stopping the device agents and the local stack ..."))
        final: Snapshot | None = None
        with _signals_deferred():
            if self.fleet is not None:
                self.fleet.stop()  # agents write their final stats.json on SIGTERM
                with contextlib.suppress(Exception):
                    final = self.snapshot() if self.stack is not None else None
            summary: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                summary = self._summary(final or self._last, error)
            if self.stack is not None:
                self.stack.stop()
            stop_leftover_children()
        if summary:
            from mledge_devstack.demo_report import print_summary, write_outputs

            paths = write_outputs(summary, self.options.output)
            if error is None:
                print_summary(summary, d)
            d.write(f"summary: {paths['summary']}\nreport:  {paths['report']}")
        return summary

    # ------------------------------------------------------------------ anomaly story
    def _anomaly(self) -> None:
        assert self.fleet is not None
        n = len(self.fleet.devices)
        self.stage("1 stream", "no model yet: every reading goes up; the first training "
                   f"starts after {self.model.min_new_records} new records")
        first = self.wait_for(
            "first training and its gate decision",
            lambda s: next((r for r in s.versions.values() if r.status in DECIDED), None),
            progress=self.data_progress)
        if first.status != Status.REJECTED:
            self.event(self.display.bad(f"  note: the first model was {first.status}, "
                                        "not rejected (check demo_pipeline.toml)"))

        self.stage("2 learn", "more data arrives; a retrain must pass the gate and reach "
                   "every device (full model: nothing to patch yet)")
        first_release = self.wait_for(
            "first release installed on every device",
            lambda s: next((r.version for r in s.released() if s.count_serving(r.version) == n),
                           None),
            progress=self.rollout_progress(
                lambda s: max((r.version for r in s.released()), default=None)))
        self.record_release(first_release)

        self.stage("3 steady", f"v{first_release} serves on every device: only anomalies, "
                   f"a {self.model.uplink.sample_rate:.0%} sample and summaries go up")
        self.fleet.set_control(phase="steady")
        steady_until = time.monotonic() + self.options.steady_seconds
        # Retrains started on data sent before the model arrived are decided first (the
        # gate compares them with what the fleet runs); the shift waits for a quiet fleet.
        current = self.wait_for(
            "the fleet runs one model and no training is in flight",
            lambda s: self._quiet_release(s, steady_until),
            progress=lambda s: (None, "measuring the uplink with a model; "
                                + ("waiting for the training in flight"
                                   if s.in_flight() else "fleet on one model")))
        if current != first_release:
            self.record_release(current)

        shift_at = time.time()
        self.marks["shift"] = self.elapsed()
        self.stage("4 shift", "the line adds a high-speed product (250 Hz shaft) half the time: "
                   f"v{current} flags those readings and sends them; they trigger a retrain")
        self.fleet.set_control(phase="shift", regime="shifted")
        final_release = self.wait_for(
            "a release trained on the new regime installed on every device",
            lambda s: next((r.version for r in s.released()
                            if (iso_to_epoch(r.created_at) or 0) > shift_at
                            and s.count_serving(r.version) == n), None),
            progress=self.rollout_progress(
                lambda s: max((r.version for r in s.released()
                               if (iso_to_epoch(r.created_at) or 0) > shift_at), default=None)))
        self.record_release(final_release)

        self.stage("5 faults", f"faults injected in {self.options.fault_rate:.0%} of readings: "
                   f"v{final_release} flags them on the device")
        self.marks["faults"] = self.elapsed()
        self.fleet.set_control(phase="faults", fault_rate=self.options.fault_rate)
        target = self.options.fault_readings_per_device
        recorded = {final_release}

        def fault_readings(snap: Snapshot) -> int:
            current = self._current_release(snap)
            low = None
            for stats in snap.devices.values():
                entry = (stats.get("demo") or {}).get(f"faults/v{current}") or {}
                count = int(entry.get("readings", 0))
                low = count if low is None else min(low, count)
            return low or 0

        labelled: dict[str, Any] = {}

        def finished(snap: Snapshot) -> bool:
            # Data sent while the new release rolled out may start one more retrain; the
            # story ends once it is decided (and, if it won, installed everywhere).
            current = self._current_release(snap)
            if current is not None and current not in recorded and \
                    snap.count_serving(current) == n:
                recorded.add(current)
                self.record_release(current)
            if not labelled and fault_readings(snap) >= target // 2:
                labelled.update(self._label(snap))
            if labelled and "version" not in labelled and not snap.in_flight():
                labelled.update(self._retrain())
            retrained = labelled.get("version")
            return (retrained is not None and retrained in snap.versions
                    and not snap.in_flight() and current in recorded
                    and fault_readings(snap) >= target)

        self.wait_for("every device reads with faults injected; no training in flight",
                      lambda s: finished(s) or None,
                      progress=lambda s: (fault_readings(s) / target,
                                          f"{fault_readings(s)}/{target} readings per device"
                                          + ("; a retrain is in flight" if s.in_flight() else "")))
        self.stage("done", "stopping")

    def _operator(self) -> Any:
        from chalicelib.operator import Operator

        assert self.stack is not None
        return Operator(clients=self.stack.clients, settings=self.stack.settings,
                        config=self.config)

    def _label(self, snap: Snapshot) -> dict[str, Any]:
        """Play the operator: confirm half of the fault readings the fleet sent as faults
        (`mledge label`). The next training sees the faults at their true rate (records
        are weighted by 1 / inclusion_p), keeps the confirmed ones out of its training
        data, and the gate refuses it if it flags fewer of them than the fleet's model."""
        sent = sorted(snap.fault_ids())
        chosen = sent[::2]
        if chosen:
            self._operator().label(self.model_name, chosen, "fault",
                                   reason="demo operator: confirmed on site",
                                   actor="demo-operator")
        self.event(f"  operator: {len(chosen)} of {len(sent)} fault readings sent labelled "
                   "'fault' (mledge label)")
        self.labels = {"fault_readings_sent": len(sent), "labelled": len(chosen)}
        return dict(self.labels)

    def _retrain(self) -> dict[str, Any]:
        """`mledge train` once nothing is in flight, so the training includes the labels."""
        from chalicelib.trigger import TriggerError

        try:
            started = self._operator().train(self.model_name, reason="operator: faults labelled",
                                             force=True)
        except TriggerError as exc:  # e.g. a training that the trigger just started
            self.event(f"  operator: retrain not started yet ({exc})")
            return {}
        self.event(f"  operator: retrain v{started.version} requested (mledge train)")
        self.labels["retrain_version"] = started.version
        return {"version": started.version}

    @staticmethod
    def _current_release(snap: Snapshot) -> int | None:
        released = [r.version for r in snap.versions.values() if r.status == Status.RELEASED]
        return released[0] if released else None

    def _quiet_release(self, snap: Snapshot, steady_until: float) -> int | None:
        if snap.in_flight() or time.monotonic() < steady_until:
            return None
        released = [r for r in snap.versions.values() if r.status == Status.RELEASED]
        if not released:
            return None
        current = released[0].version
        return current if snap.count_serving(current) == len(snap.devices) else None

    # ------------------------------------------------------------------ digits story
    def _digits(self) -> None:
        assert self.fleet is not None and self.stack is not None
        from chalicelib.operator import Operator

        n = len(self.fleet.devices)
        operator = Operator(clients=self.stack.clients, settings=self.stack.settings,
                            config=self.config)
        consumed = 0
        decisions: list[VersionRecord] = []
        for share, label in ((0.10, "10 %"), (0.70, "70 %")):
            limit = int(DIGITS_TOTAL * share)
            self.fleet.set_control(phase=f"stream-{int(share * 100)}", digits_limit=limit)
            self.stage(f"stream {label}", f"devices send the first {label} of the digits "
                       f"({limit} images) with their labels")
            need = limit - consumed
            self.wait_for(f"{limit} images stored in S3", functools.partial(_stored, need),
                          progress=functools.partial(_stored_progress, need))
            self.stage(f"train {label}", f"the operator starts a training on {label} "
                       "(`mledge train digits`)")
            start = operator.train(self.model_name, reason=f"demo: operator trains on {label}")
            consumed = limit
            version = start.version
            decisions.append(self.wait_for(
                f"v{version}'s gate decision", functools.partial(_decided, version),
                progress=functools.partial(_training_progress, version)))
        released = decisions[-1]
        if released.status == Status.REJECTED:
            raise DemoError(f"the 70 % model v{released.version} was rejected: "
                            + "; ".join(failing_reasons(released)))
        self.stage("release", f"v{released.version} goes to every device")
        self.wait_for("every device serves the classifier",
                      lambda s: s.count_serving(released.version) == n or None,
                      progress=self.rollout_progress(lambda s: released.version))
        self.record_release(released.version)
        self.stage("classify", "devices classify the remaining 30 % locally "
                   f"(send a {self.model.uplink.sample_rate:.0%} sample and summaries)")
        self.marks["classify"] = self.elapsed()
        self.fleet.set_control(phase="classify", digits_limit=DIGITS_TOTAL)
        left = DIGITS_TOTAL - int(DIGITS_TOTAL * 0.70)

        def classified(snap: Snapshot) -> int:
            return sum(int(((st.get("demo") or {}).get(f"classify/v{released.version}") or {})
                           .get("readings", 0)) for st in snap.devices.values())

        self.wait_for("the remaining images classified on the devices",
                      lambda s: classified(s) >= left or None,
                      progress=lambda s: (classified(s) / left,
                                          f"{classified(s)}/{left} images classified on devices"))
        self.stage("done", "stopping")

    # ------------------------------------------------------------------ records
    def record_release(self, version: int) -> None:
        """What one release shipped and how the fleet took it, read while it is current."""
        assert self.stack is not None and self.registry is not None and self.fleet is not None
        record = self.registry.get(self.model_name, version)
        iot, s3 = self.stack.clients.iot, self.stack.clients.s3
        release = record.release or {}
        job_id = release.get("job_id")
        manifest_key = release.get("manifest_key") or (
            layout.release_prefix(self.model_name, version) + "manifest.json")
        manifest: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            body = s3.get_object(Bucket=self.stack.settings.bucket, Key=manifest_key)["Body"]
            manifest = json.loads(body.read())
        per_device: dict[str, dict[str, Any]] = {}
        for device in self.fleet.devices:
            details: dict[str, Any] = {}
            status = None
            with contextlib.suppress(Exception):
                execution = iot.describe_job_execution(jobId=job_id, thingName=device.name)[
                    "execution"]
                details = (execution.get("statusDetails") or {}).get("detailsMap") or {}
                status = execution.get("status")
            stats = device.stats()
            installed = stats.get("installed") or {}
            per_device[device.name] = {
                "status": status, "codec": details.get("codec"),
                "bytes_downloaded": _int(details.get("bytes_downloaded")),
                "previous_version": _int(details.get("previous_version")),
                "installed_at_s": self.rel(installed.get("installed_at"))
                if installed.get("version") == version else None,
            }
        full = manifest.get("full") or {}
        deltas = [{"from_version": d.get("from_version"), "codec": d.get("codec"),
                   "size": d.get("size")} for d in manifest.get("deltas", [])]
        via: dict[str, int] = {}
        for info in per_device.values():
            via[str(info["codec"])] = via.get(str(info["codec"]), 0) + 1
        shipped = sum(i["bytes_downloaded"] or 0 for i in per_device.values())
        gate = record.gate or {}
        threshold_at = self.rel(iso_to_epoch(record.created_at))
        installed_times = [i["installed_at_s"] for i in per_device.values() if i["installed_at_s"]]
        fleet_at = max(installed_times) if len(installed_times) == len(per_device) else None
        entry = {
            "version": version, "job_id": job_id,
            "metric": gate.get("metric", self.model.metric),
            "challenger": gate.get("challenger"), "champion": gate.get("champion"),
            "gate": {"decision": gate.get("decision"), "reasons": gate.get("reasons", [])},
            "model_bytes": manifest.get("model_size"),
            "full": {"encoding": full.get("encoding"), "size": full.get("size")},
            "deltas": deltas,
            "bytes_shipped": {"total": shipped,
                              "if_all_full": (full.get("size") or 0) * len(per_device)},
            "devices_updated": sum(1 for i in per_device.values() if i["status"] == "SUCCEEDED"),
            "devices": len(per_device),
            "updated_via": via,
            "times_s": {"threshold": threshold_at,
                        "decided": self.rel(decided_at(record)),
                        "released": self.rel(iso_to_epoch(release.get("released_at"))),
                        "fleet_swapped": fleet_at},
            "seconds_threshold_to_fleet": (round(fleet_at - threshold_at, 2)
                                           if fleet_at is not None and threshold_at is not None
                                           else None),
            "per_device": per_device,
        }
        self.releases = [r for r in self.releases if r["version"] != version] + [entry]
        codecs = ", ".join(f"{k} x{v}" for k, v in via.items())
        self.event(self.display.good(f"  fleet: v{version} on {entry['devices_updated']}/"
                                     f"{len(per_device)} devices") +
                   f" via {codecs}; {shipped:,} B shipped "
                   f"(all full: {entry['bytes_shipped']['if_all_full']:,} B); threshold to "
                   f"whole fleet {entry['seconds_threshold_to_fleet']} s")

    def _summary(self, snap: Snapshot | None, error: BaseException | None) -> dict[str, Any]:
        from mledge_devstack.demo_report import build_summary

        return build_summary(self, snap, error)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------ process hygiene


def stop_leftover_children(timeout: float = 5.0) -> None:
    """Terminate any process this one started that is still running (e.g. a trainer the
    operator started from this process), then kill what ignores SIGTERM."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def _signals_deferred():
    """Let cleanup finish: a second Ctrl-C while stopping is noted, not obeyed mid-way."""
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            previous[sig] = signal.signal(sig, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise DemoInterrupted(f"signal {signal.Signals(signum).name}")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    return Demo(options).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mledge_devstack.demo",
        description="The local end-to-end demo: a simulated fleet of real device agents, the "
                    "whole retrain-and-deliver loop (docs/demo.md).")
    parser.add_argument("--scenario", choices=sorted(SCENARIO_MODEL), default="anomaly")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--fleet-rate", type=float, default=30.0,
                        help="readings per second across the fleet (split evenly)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where summary.json and report.html go")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="stack files, device state, logs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole story")
    parser.add_argument("--stage-timeout", type=float, default=300.0,
                        help="seconds for one step of the story (raise it on a loaded machine)")
    parser.add_argument("--plain", action="store_true", help="no live redraw, no colours")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A slow stop escalates to SIGKILL by design; the display says what is stopping.
    logging.getLogger("mledge_devstack.procs").setLevel(logging.ERROR)
    options = DemoOptions(scenario=args.scenario, devices=args.devices,
                          fleet_rate=args.fleet_rate, output=args.output.resolve(),
                          workdir=args.workdir.resolve(), timeout=args.timeout, stage_timeout=args.stage_timeout,
                          live=False if args.plain else None)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)  # the terminal closed: clean up too
    # Ctrl-C stops the story even where the demo was started with SIGINT ignored (a
    # background job of a script): cleanup then runs as for any other stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = run_demo(options)
    except (KeyboardInterrupt, DemoInterrupted):
        return 130
    except DemoError:
        return 1
    return 0 if summary.get("outcome") == "passed" else 1



# Conditions the digits story waits for (bound with functools.partial inside its loop).
def _stored(need: int, snapshot: Snapshot) -> bool | None:
    return snapshot.new_records >= need or None


def _stored_progress(need: int, snapshot: Snapshot) -> tuple[float | None, str]:
    return snapshot.new_records / need, f"{snapshot.new_records}/{need} new records"


def _decided(version: int, snapshot: Snapshot) -> VersionRecord | None:
    record = snapshot.versions.get(version)
    return record if record is not None and record.status in DECIDED else None


def _training_progress(version: int, snapshot: Snapshot) -> tuple[float | None, str]:
    return None, f"training v{version} (the real trainer)"


if __name__ == "__main__":
    sys.exit(main())
