"""A simulated fleet: hundreds to thousands of real device agents from a few processes.

```python
from mledge_devstack.fleet import FaultPlan, FleetSimulator

with FleetSimulator(stack, "vibration-anomaly", devices=1000, processes=4,
                    faults=FaultPlan(offline=0.02, slow=0.05, corrupt=0.01)) as fleet:
    ...                                # release something
    fleet.wait(lambda s: s.serving(version=2) >= 980, timeout=300)
```

Each simulated device is the real `mledge_edge.Agent` (jobs client, downloader,
updater, model store, ONNX Runtime session) with its own certificate, its own
MQTT connection (client id = thing name), its own state folder. A worker
process (`python -m mledge_devstack.fleet worker SPEC`) runs a share of the
devices; awscrt's event loop and the process are shared, nothing else is.

Faults (`FaultPlan`, each a fraction of the fleet, chosen by seed):
- `offline`: the device is off for `offline_seconds` after the fleet starts,
  then boots and catches up (start-next on connect);
- `slow`: its downloads crawl at `slow_bytes_per_second`;
- `corrupt`: every byte stream it downloads arrives with a flipped byte (the
  SHA-256 check catches it; the update is REJECTED);
- `crash`: it loses power once mid-install (at `crash_step`), then boots
  again on the same state folder (the store's recovery, the pending report);
- `model_fails`: a new model fails on this device (its smoke rows fail: the
  update is REJECTED).

Workers write `status-<n>.json` every `STATUS_INTERVAL` seconds: per device,
the serving version and when each version started serving, MQTT messages and
bytes both ways, download bytes, crashes. `FleetStatus` aggregates them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mledge_devstack.procs import ManagedProcess

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.5
FAULTS = ("offline", "slow", "corrupt", "crash", "model_fails")


class FleetError(Exception):
    """The simulated fleet could not start, or a wait on it ran out."""


@dataclass(frozen=True)
class FaultPlan:
    """Which share of the fleet suffers each fault (a device may get several)."""

    offline: float = 0.0
    slow: float = 0.0
    corrupt: float = 0.0
    crash: float = 0.0
    model_fails: float = 0.0
    seed: int = 1
    offline_seconds: float = 20.0
    slow_bytes_per_second: float = 4096.0
    crash_step: str = "before_state_write"
    exempt: tuple[str, ...] = ()  # things that suffer nothing (e.g. the canary devices)

    def __post_init__(self) -> None:
        for name in FAULTS:
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"fault share {name} must be within 0..1, got {share}")

    def assign(self, things: list[str]) -> dict[str, list[str]]:
        """thing -> its faults: exactly round(share * n) devices per fault, by seed."""
        rng = random.Random(self.seed)
        out: dict[str, list[str]] = {thing: [] for thing in things}
        candidates = [t for t in things if t not in set(self.exempt)]
        for name in FAULTS:
            count = min(len(candidates), round(getattr(self, name) * len(things)))
            for thing in rng.sample(candidates, count):
                out[thing].append(name)
        return out


@dataclass
class DeviceSpec:
    thing: str
    cert: str
    key: str
    ca: str
    state_dir: str
    faults: list[str] = field(default_factory=list)


@dataclass
class WorkerSpec:
    model: str
    endpoint: str
    port: int
    status_path: str
    devices: list[DeviceSpec]
    faults: FaultPlan
    rate: float = 0.0  # telemetry readings per second per device
    log_level: str = "WARNING"
    release_keys: str = ""  # the stage's release public key (PEM): every release is verified

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        raw = json.loads(path.read_text())
        raw["devices"] = [DeviceSpec(**d) for d in raw["devices"]]
        raw["faults"] = FaultPlan(**{**raw["faults"], "exempt": tuple(raw["faults"]["exempt"])})
        return cls(**raw)


# ---------------------------------------------------------------- one device


class SimulatedPowerLoss(BaseException):
    """Raised by the crash hook: unwinds the agent's jobs thread like a power cut."""


class SimulatedDevice:
    """One real agent plus the faults it suffers and the counters the bench reads."""

    def __init__(self, spec: DeviceSpec, worker: WorkerSpec) -> None:
        self.spec = spec
        self.worker = worker
        self.faults = set(spec.faults)
        self.lock = threading.Lock()
        self.counts = {"msgs_out": 0, "bytes_out": 0, "msgs_in": 0, "bytes_in": 0,
                       "download_bytes": 0, "crashes": 0, "boots": 0}
        self.served_at: dict[str, float] = {}
        self.serving: int | None = None
        self.last_job: dict[str, Any] | None = None
        self.crashed = threading.Event()
        self.agent: Any = None

    # -- lifecycle
    def boot(self) -> None:
        from mledge_edge.agent import Agent
        from mledge_edge.config import AgentConfig

        config = AgentConfig(
            thing=self.spec.thing, model=self.worker.model, endpoint=self.worker.endpoint,
            port=self.worker.port, cert=self.spec.cert, key=self.spec.key, ca=self.spec.ca,
            state_dir=self.spec.state_dir, sensor="vibration", rate=self.worker.rate,
            stats_interval=3600.0, request_timeout=30.0, download_retries=3,
            download_timeout=30.0, log_level=self.worker.log_level,
            release_keys=self.worker.release_keys or None,
        )
        agent = Agent(config, crash_hook=self._crash_hook)
        self._instrument(agent)
        self.agent = agent
        with self.lock:
            self.counts["boots"] += 1
        agent.start()
        if agent.handle.info is not None:
            self._serving(agent.handle.info.version)

    def power_off(self) -> None:
        """Stop without the agent's orderly shutdown of the jobs thread (it is gone)."""
        agent, self.agent = self.agent, None
        if agent is None:
            return
        agent._stop.set()
        agent.jobs._stop.set()
        agent.link.disconnect()

    def stop(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            agent.stop()

    # -- faults and counters (wrapping the real objects, never replacing their logic)
    def _crash_hook(self, step: str) -> None:
        marker = Path(self.spec.state_dir) / "simulated-crash-done"
        if "crash" in self.faults and step == self.worker.faults.crash_step and not marker.exists():
            marker.write_text(step)
            with self.lock:
                self.counts["crashes"] += 1
            self.crashed.set()
            raise SimulatedPowerLoss(step)

    def _instrument(self, agent: Any) -> None:
        link = agent.link
        publish, subscribe = link.publish, link.subscribe

        def counted_publish(topic: str, payload: bytes, *args: Any, **kwargs: Any) -> None:
            with self.lock:
                self.counts["msgs_out"] += 1
                self.counts["bytes_out"] += len(topic) + len(payload)
            publish(topic, payload, *args, **kwargs)

        def counted_subscribe(topic: str, callback: Callable[[str, bytes], None]) -> None:
            def counted(t: str, payload: bytes) -> None:
                with self.lock:
                    self.counts["msgs_in"] += 1
                    self.counts["bytes_in"] += len(t) + len(payload)
                callback(t, payload)

            subscribe(topic, counted)

        link.publish, link.subscribe = counted_publish, counted_subscribe

        downloader = agent.downloader
        fetch, transfer = downloader.fetch, downloader._transfer
        slow = "slow" in self.faults
        rate = self.worker.faults.slow_bytes_per_second

        def counted_fetch(sha256: str, size: int, url_for: Any, progress: Any = None,
                          stats: Any = None) -> bytes:
            from mledge_edge.download import DownloadStats

            stats = stats if stats is not None else DownloadStats()
            last = [0]

            def paced(done: int, total: int) -> None:
                if slow and done > last[0]:
                    time.sleep((done - last[0]) / rate)
                last[0] = done
                if progress is not None:
                    progress(done, total)

            try:
                return fetch(sha256, size, url_for, paced, stats)
            finally:
                with self.lock:
                    self.counts["download_bytes"] += stats.bytes_fetched

        def corrupting_transfer(sha256: str, url: str, offset: int, size: int, progress: Any,
                                stats: Any) -> None:
            transfer(sha256, url, offset, size, progress, stats)
            part = downloader.folder / f"{sha256}.part"
            if part.exists() and part.stat().st_size:
                with open(part, "r+b") as fh:  # a bit flipped on the way
                    first = fh.read(1)
                    fh.seek(0)
                    fh.write(bytes([first[0] ^ 0x01]))

        downloader.fetch = counted_fetch
        if "corrupt" in self.faults:
            downloader._transfer = corrupting_transfer

        if "model_fails" in self.faults:
            from mledge_edge.updater import UpdateRejectedError

            def failing_load(path: Any, job: Any) -> Any:
                raise UpdateRejectedError("smoke", "simulated: the model fails on this device's "
                                              "hardware (smoke rows do not match)")

            agent.updater._load_checked = failing_load

        installed = agent.updater.on_installed

        def on_installed(record: Any) -> None:
            if installed is not None:
                installed(record)
            self._serving(record.version)

        agent.updater.on_installed = on_installed

    def _serving(self, version: int) -> None:
        with self.lock:
            self.serving = version
            self.served_at.setdefault(str(version), time.time())

    def snapshot(self) -> dict[str, Any]:
        agent = self.agent
        last = agent._last_job if agent is not None else None
        with self.lock:
            return {"serving": self.serving, "served_at": dict(self.served_at),
                    "faults": sorted(self.faults), "online": agent is not None,
                    "last_job": dict(last) if last else None, **self.counts}


# ------------------------------------------------------------------- a worker


def run_worker(spec_path: Path) -> None:
    spec = WorkerSpec.load(spec_path)
    logging.basicConfig(level=spec.log_level,  # the thread name carries the thing name
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    devices = [SimulatedDevice(d, spec) for d in spec.devices]
    started = time.monotonic()
    pending = list(devices)

    def write_status() -> None:
        body = {"pid": os.getpid(), "at": time.time(),
                "cpu_seconds": sum(os.times()[:2]),
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "devices": {d.spec.thing: d.snapshot() for d in devices}}
        tmp = Path(spec.status_path + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(spec.status_path)

    while not stop.is_set():
        # Boot what is due (offline devices later), a few at a time so TLS handshakes spread.
        due = [d for d in pending if "offline" not in d.faults
               or time.monotonic() - started >= spec.faults.offline_seconds]
        for device in due[:50]:
            pending.remove(device)
            try:
                device.boot()
            except Exception as exc:  # the broker refused: try again next round
                log.warning("%s: boot failed: %s", device.spec.thing, exc)
                device.power_off()
                pending.append(device)
        for device in devices:
            if device.crashed.is_set():
                device.crashed.clear()
                device.power_off()
                try:
                    device.boot()  # power back: recovery from the state folder
                except Exception as exc:
                    log.warning("%s: reboot failed: %s", device.spec.thing, exc)
                    pending.append(device)
        write_status()
        stop.wait(STATUS_INTERVAL)
    for device in devices:
        try:
            device.stop()
        except Exception as exc:
            log.warning("%s: stop: %s", device.spec.thing, exc)
    write_status()


# --------------------------------------------------------------- aggregation


@dataclass
class FleetStatus:
    devices: dict[str, dict[str, Any]]
    worker_cpu_seconds: float
    worker_peak_rss_mb: float = 0.0

    def serving(self, version: int) -> int:
        return sum(1 for d in self.devices.values() if d["serving"] == version)

    def served_times(self, version: int) -> list[float]:
        return sorted(d["served_at"][str(version)] for d in self.devices.values()
                      if str(version) in d["served_at"])

    def with_fault(self, fault: str) -> list[str]:
        return [t for t, d in self.devices.items() if fault in d["faults"]]

    def totals(self) -> dict[str, int]:
        keys = ("msgs_out", "bytes_out", "msgs_in", "bytes_in", "download_bytes", "crashes",
                "boots")
        return {k: sum(int(d.get(k, 0)) for d in self.devices.values()) for k in keys}


class FleetSimulator:
    """Provision `devices` things in the stack and run them in `processes` workers."""

    def __init__(self, stack: Any, model: str, *, devices: int, processes: int = 2,
                 faults: FaultPlan | None = None, prefix: str = "sim",
                 directory: Path | None = None, rate: float = 0.0,
                 extra_groups: dict[str, list[str]] | None = None,
                 log_level: str = "WARNING") -> None:
        if devices < 1 or processes < 1:
            raise ValueError("devices and processes must be at least 1")
        self.stack = stack
        self.model = model
        self.count = devices
        self.processes = min(processes, devices)
        self.faults = faults or FaultPlan()
        self.prefix = prefix
        self.directory = Path(directory or Path(stack.directory) / "fleet")
        self.rate = rate
        self.extra_groups = extra_groups or {}
        self.log_level = log_level
        self.things = [f"{prefix}-{i:05d}" for i in range(devices)]
        self.workers: list[ManagedProcess] = []

    def provision(self) -> None:
        """Things in the model's group (and any extra group), a certificate each."""
        from mledge_devstack.resources import provision_thing as add_thing

        iot = self.stack.clients.iot
        for group in self.extra_groups:
            with contextlib.suppress(iot.exceptions.ResourceAlreadyExistsException):
                iot.create_thing_group(thingGroupName=group)
        for thing in self.things:
            self.stack.provision_thing(thing, self.model)
            for group, members in self.extra_groups.items():
                if thing in members:
                    add_thing(self.stack.clients, thing, group)

    def start(self) -> FleetSimulator:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.provision()
        faults = self.faults.assign(self.things)
        shares = [self.things[i::self.processes] for i in range(self.processes)]
        env = dict(os.environ)
        env.update(self.stack.env)
        for n, share in enumerate(shares):
            devices = []
            for thing in share:
                creds = self.stack.credentials(thing)
                devices.append(DeviceSpec(thing, str(creds.cert_path), str(creds.key_path),
                                          str(creds.ca_path),
                                          str(self.directory / "devices" / thing),
                                          faults[thing]))
            spec = WorkerSpec(model=self.model, endpoint="localhost", port=self.stack.mqtt_port,
                              status_path=str(self.directory / f"status-{n}.json"),
                              devices=devices, faults=self.faults, rate=self.rate,
                              log_level=self.log_level,
                              release_keys=str(self.stack.release_keys_path or ""))
            spec_path = self.directory / f"worker-{n}.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            Path(spec.status_path).unlink(missing_ok=True)
            self.workers.append(ManagedProcess(
                f"fleet-{n}", [sys.executable, "-m", "mledge_devstack.fleet", "worker",
                               str(spec_path)],
                log_path=self.directory / f"worker-{n}.log", env=env).start())
        return self

    def status(self) -> FleetStatus:
        devices: dict[str, dict[str, Any]] = {}
        cpu = rss = 0.0
        for n in range(len(self.workers)):
            path = self.directory / f"status-{n}.json"
            try:
                body = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            devices.update(body["devices"])
            cpu += float(body.get("cpu_seconds", 0.0))
            rss = max(rss, float(body.get("rss_mb", 0.0)))
        for worker in self.workers:
            if not worker.alive():
                raise FleetError(f"{worker.name} exited: {worker.log_tail()}")
        return FleetStatus(devices, cpu, rss)

    def wait(self, done: Callable[[FleetStatus], bool], *, timeout: float,
             poll: float = 0.5) -> FleetStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if done(status):
                return status
            if time.monotonic() > deadline:
                online = sum(1 for d in status.devices.values() if d["online"])
                raise FleetError(f"fleet condition not met within {timeout:.0f}s "
                                 f"({online} of {self.count} devices online)")
            time.sleep(poll)

    def wait_online(self, *, timeout: float, include_offline: bool = False) -> FleetStatus:
        expected = self.count - (0 if include_offline else
                                 len([t for t, f in self.faults.assign(self.things).items()
                                      if "offline" in f]))
        return self.wait(lambda s: sum(1 for d in s.devices.values() if d["online"]) >= expected,
                         timeout=timeout)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=30.0)

    def __enter__(self) -> FleetSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run the devices a spec file names (used by FleetSimulator)")
    worker.add_argument("spec")
    args = parser.parse_args(argv)
    if args.command == "worker":
        run_worker(Path(args.spec))


if __name__ == "__main__":
    main()
