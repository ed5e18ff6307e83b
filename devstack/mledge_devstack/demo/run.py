"""`make demo`: the whole loop on one machine, with a simulated fleet of real device agents.

    python -m mledge_devstack.demo [--scenario anomaly|digits] [--devices 10]

Starts the local stack (moto server + IoT bridge, mosquitto with TLS and per-thing ACLs,
the dispatcher running app.py's handlers, the local training backend running the real
trainer), provisions N things with their own certificates, runs one device agent per
thing (`mledge_devstack.demo.device`: `mledge_edge.Agent` + a scenario-controlled
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

import contextlib
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
from pathlib import Path
from typing import Any, TypeVar

from chalicelib import layout
from chalicelib.config import ModelConfig, load_pipeline_config
from chalicelib.registry import Registry, Status
from chalicelib.state import StateStore
from mledge_devstack.demo.display import Display
from mledge_devstack.demo.record import (  # noqa: F401  (re-exported: the demo's public names)
    DECIDED,
    DEFAULT_OUTPUT,
    DEFAULT_WORKDIR,
    DEMO_PIPELINE_CONFIG,
    RELEASED,
    SCENARIO_MODEL,
    DemoError,
    DemoInterruptedError,
    DemoOptions,
    Snapshot,
    decided_at,
    failing_reasons,
    iso_to_epoch,
)
from mledge_devstack.procs import ManagedProcess
from mledge_devstack.stack import PROJECT_DIR, LocalStack, ThingCredentials, child_environment

log = logging.getLogger(__name__)

DIGITS_TOTAL = 1797  # scikit-learn's digits data set
POLL_SECONDS = 0.5

T = TypeVar("T")


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
                sys.executable, "-m", "mledge_devstack.demo.device",
                "--control", str(self.control_path), "--scenario", self.options.scenario,
                "--device-index", str(device.index), "--device-count", str(len(self.devices)),
                "--thing", device.name, "--model", self.model,
                "--endpoint", device.thing.host, "--port", str(device.thing.port),
                "--cert", str(device.thing.cert_path), "--key", str(device.thing.key_path),
                "--ca", str(device.thing.ca_path), "--state-dir", str(device.state_dir),
                "--release-keys", str(device.thing.release_keys_path),
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


class Demo:
    """One run of a scenario: the stack, the fleet, the observer, the display, the record."""

    def __init__(self, options: DemoOptions, story: Callable[[Demo], None]) -> None:
        self.options = options.validate()
        self.story = story  # the scenario (anomaly.py, digits.py) told on this run
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
            self.story(self)
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
        self.registry = Registry.for_settings(settings, clients)
        self.state = StateStore.for_settings(settings, clients)
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
            reason = ("interrupted" if isinstance(error, KeyboardInterrupt | DemoInterruptedError)
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
            from mledge_devstack.demo.report import print_summary, write_outputs

            paths = write_outputs(summary, self.options.output)
            if error is None:
                print_summary(summary, d)
            d.write(f"summary: {paths['summary']}\nreport:  {paths['report']}")
        return summary

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
        from mledge_devstack.demo.report import build_summary

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
