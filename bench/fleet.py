"""A release through a simulated fleet of 100 and 1,000 devices on the local stack.

    python bench/fleet.py                          # 100 and 1,000 devices, 4 worker processes
    python bench/fleet.py --devices 100 --processes 2

Per fleet size, on a fresh local stack (moto + bridge, mosquitto, dispatcher with the
real handlers) and a fleet of real agents (mledge_devstack.fleet: own certificate,
own MQTT connection, own state folder each), with faults injected on the devices
outside the canary group (2% offline until 60 s after their worker starts, i.e.
during the v1 rollout, 5% slow links, 1% corrupted
downloads, 1% crash mid-install, 1% a model that fails on the device; the abort
config's minimum is raised to 50 executed things, see `pipeline_with_canary`):

1. v1, a good model, released with the pipeline's rollout config and a canary
   group (5% of the fleet): time from the ModelApproved event to 50%, 95% and
   100% of the devices that can run it serving it; MQTT messages and bytes per
   device (both ways) and download bytes; CPU seconds of the bridge process
   (moto + IoT Jobs engine + topic rule) and of mosquitto, per device.
2. v2, a bad model (trained on a machine mode the fleet never runs): time to the
   canary's abort and to the fleet being back on v1 (automatic rollback).

The canary controller runs every second here (`canary.tick`, what the
`canary_tick` Lambda does every minute in AWS: add up to a minute per canary
decision there). Baselines printed beside the figures: the rollout-rate floor
(how long the job's rollout config alone takes to notify every device if each
update were instant), the IoT Jobs protocol floor per device (start-next,
update SUCCEEDED, their replies and the notify-next: 5 messages) and the bridge's
idle CPU over the same wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
for part in ("", "update_format", "edge", "devstack", "training_image"):
    sys.path.insert(0, str(REPO / part) if part else str(REPO))

from mledge_devstack.fleet import FaultPlan, FleetSimulator, FleetStatus  # noqa: E402
from mledge_devstack.fleet_release import (  # noqa: E402
    UNSEEN_MODES,
    announce_release,
    next_version,
    train_release,
)
from mledge_devstack.rollout import RolloutGate  # noqa: E402
from mledge_devstack.stack import LocalStack  # noqa: E402

from chalicelib import canary  # noqa: E402
from chalicelib.config import load_pipeline_config  # noqa: E402
from chalicelib.ota import job_request  # noqa: E402
from chalicelib.registry import Registry  # noqa: E402

MODEL = "vibration-anomaly"
CANARY_GROUP = "mledge-vibration-canary"
QUICK_TRAINING = {"k_min": "3", "k_max": "3"}
PROTOCOL_FLOOR_MESSAGES = 5
ABORT_MIN_EXECUTED = 50
# Offline devices boot this long after their worker: during the v1 rollout.
OFFLINE_SECONDS = 60.0


def pipeline_with_canary(path: Path) -> Path:
    text = (REPO / "chalicelib" / "pipeline.toml").read_text()
    # 2% of the devices here cannot take any model (corrupt downloads, a model that
    # fails on them): with the stock minimum of 10 executed things the abort config
    # (10%) cancels the rollout whenever two of them are among the first ten.
    assert "min_executed_things = 10" in text
    text = text.replace("min_executed_things = 10", f"min_executed_things = {ABORT_MIN_EXECUTED}")
    path.write_text(text + f"""
[models.{MODEL}.canary]
thing_group = "{CANARY_GROUP}"
health_readings = 50
min_reports = 3
max_failure_percent = 20.0
max_anomaly_rate = 0.2
max_latency_ms = 200.0
max_wait_minutes = 10
""")
    return path


def rollout_floor_seconds(devices: int, config_path: Path) -> float:
    """Seconds the model's rollout config needs to notify `devices` things if every
    update succeeded the moment it was notified (1 s steps)."""
    model = load_pipeline_config(config_path).model(MODEL)
    rollout = job_request(job_id="x", document={}, model_config=model, target_arn="a",
                          presign_role_arn="r", stage="s", version=1)
    gate = RolloutGate.from_config(rollout["jobExecutionsRolloutConfig"])
    for n in range(devices):
        gate.add(f"t{n}", "arn")
    now = succeeded = 0
    while gate.waiting:
        succeeded += len(gate.release(float(now), succeeded))
        if gate.waiting:
            now += 1
    return float(now)


def cpu_seconds(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        total = proc.cpu_times().user + proc.cpu_times().system
        for child in proc.children(recursive=True):
            total += child.cpu_times().user + child.cpu_times().system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def tick(stack: LocalStack) -> canary.TickResult:
    config = load_pipeline_config(stack.settings.pipeline_config)
    [result] = [r for r in canary.tick(clients=stack.clients, settings=stack.settings,
                                       config=config) if r.model == MODEL]
    return result


def percentile_time(times: list[float], share: float, total: int, start: float) -> float | None:
    needed = max(1, round(share * total))
    return times[needed - 1] - start if len(times) >= needed else None


def fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


def run_size(devices: int, processes: int, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": devices}
    with tempfile.TemporaryDirectory(prefix="mledge-bench-fleet-") as tmp:
        config = pipeline_with_canary(Path(tmp) / "pipeline.toml")
        out["rollout_floor_s"] = rollout_floor_seconds(devices, config)
        canary_count = max(5, devices // 20)
        things = [f"sim-{i:05d}" for i in range(devices)]
        canary_things = things[:: max(1, devices // canary_count)][:canary_count]
        faults = FaultPlan(offline=0.02, slow=0.05, corrupt=0.01, crash=0.01, model_fails=0.01,
                           seed=5, offline_seconds=OFFLINE_SECONDS, slow_bytes_per_second=4096.0,
                           exempt=tuple(canary_things))
        plan = faults.assign(things)
        unable = {t for t, f in plan.items() if {"corrupt", "model_fails"} & set(f)}
        able = [t for t in things if t not in unable]
        started = time.monotonic()
        with LocalStack(Path(tmp) / "stack", pipeline_config=config) as stack:
            fleet = FleetSimulator(stack, MODEL, devices=devices, processes=processes,
                                   faults=faults, extra_groups={CANARY_GROUP: canary_things})
            with fleet:
                fleet.wait_online(timeout=timeout)
                out["setup_s"] = time.monotonic() - started
                pids = stack.pids()
                idle0 = cpu_seconds(pids["cloud"])
                time.sleep(5.0)
                out["bridge_idle_cpu_per_s"] = (cpu_seconds(pids["cloud"]) - idle0) / 5.0
                before = fleet.status().totals()
                cloud0, broker0 = cpu_seconds(pids["cloud"]), cpu_seconds(pids["mosquitto"])

                # 1. a good release through canary and rollout
                v1 = next_version(stack, MODEL)
                artifact = train_release(stack, MODEL, v1, records=1000,
                                         hyperparameters=QUICK_TRAINING)
                t0 = time.time()  # the ModelApproved event: packaging, canary, rollout follow
                announce_release(stack, MODEL, v1, artifact, reason="bench: good model")
                decision = None
                deadline = time.monotonic() + timeout

                def all_serving(status: FleetStatus, version: int) -> bool:
                    return all(status.devices.get(t, {}).get("serving") == version for t in able)

                while True:
                    if decision != canary.PROMOTE:
                        result = tick(stack)
                        decision = result.decision
                        if decision == canary.PROMOTE:
                            out["canary_promote_s"] = time.time() - t0
                        elif decision not in (canary.WAIT,):
                            raise SystemExit(f"canary did not promote v1: {result}")
                    status = fleet.status()
                    if all_serving(status, v1):
                        break
                    if decision == canary.PROMOTE:  # the fleet job exists from now on
                        job = stack.clients.iot.describe_job(
                            jobId=f"mledge-{MODEL}-v{v1:05d}")["job"]
                        if job["status"] == "CANCELED":
                            raise SystemExit(f"the v1 rollout was aborted: {job.get('comment')}")
                    if time.monotonic() > deadline:
                        late = [t for t in able if status.devices.get(t, {}).get("serving") != v1]
                        raise SystemExit(f"{len(late)} devices never served v1: {late[:10]}")
                    time.sleep(1.0)
                wall = time.time() - t0
                after = status.totals()
                times = [status.devices[t]["served_at"][str(v1)] for t in able]
                times.sort()
                for share in (0.5, 0.95, 1.0):
                    out[f"serving_{int(share * 100)}_s"] = percentile_time(times, share,
                                                                         len(able), t0)
                for key in ("msgs_out", "bytes_out", "msgs_in", "bytes_in", "download_bytes"):
                    out[f"{key}_per_device"] = (after[key] - before[key]) / devices
                out["bridge_cpu_per_device_ms"] = (
                    (cpu_seconds(pids["cloud"]) - cloud0
                     - out["bridge_idle_cpu_per_s"] * wall) / devices * 1000)
                out["bridge_idle_cpu_same_wall_ms_per_device"] = (
                    out["bridge_idle_cpu_per_s"] * wall / devices * 1000)
                out["broker_cpu_per_device_ms"] = (
                    (cpu_seconds(pids["mosquitto"]) - broker0) / devices * 1000)
                out["worker_peak_rss_mb"] = status.worker_peak_rss_mb
                out["unable_devices"] = len(unable)
                out["crashes_recovered"] = after["crashes"]

                # 2. a bad release: the canary aborts it, the fleet goes back to v1
                v2 = next_version(stack, MODEL)
                artifact = train_release(stack, MODEL, v2, records=1000, modes=UNSEEN_MODES,
                                         hyperparameters=QUICK_TRAINING)
                t0 = time.time()
                announce_release(stack, MODEL, v2, artifact,
                                 reason="bench: model for the wrong machine")
                deadline = time.monotonic() + timeout
                while True:
                    result = tick(stack)
                    if result.decision == canary.ABORT and result.version == v2:
                        out["abort_s"] = time.time() - t0
                        out["abort_reason"] = result.reason
                        break
                    if result.decision == canary.PROMOTE:
                        raise SystemExit(f"the bad model was promoted: {result}")
                    if time.monotonic() > deadline:
                        raise SystemExit(f"no abort: {result}")
                    time.sleep(1.0)
                registry = Registry(stack.settings.registry_table, stack.clients.dynamodb)
                status = fleet.wait(lambda s: all_serving(s, v1)
                                    and registry.released_version(MODEL) == v1, timeout=timeout)
                out["rollback_s"] = time.time() - t0
                out["devices_that_ran_v2"] = sum(
                    1 for d in status.devices.values() if str(v2) in d["served_at"])
                out["canary_devices"] = len(canary_things)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for devices in args.devices:
        r = run_size(devices, args.processes, args.timeout)
        results.append(r)
        n = r["devices"]
        print(f"\n== {n} devices ({args.processes} worker processes; {r['canary_devices']} canary "
              f"devices; {r['unable_devices']} devices that cannot take a model by design) ==")
        print(f"setup (provision, certificates, boot, connect): {fmt(r['setup_s'])}; worker peak "
              f"RSS {r['worker_peak_rss_mb']:.0f} MB ({r['worker_peak_rss_mb'] * args.processes / n:.1f} "
              f"MB/device)")
        print(f"v1 release (times from the ModelApproved event): canary promoted at "
              f"{fmt(r.get('canary_promote_s'))}")
        print(f"  serving 50% {fmt(r['serving_50_s'])} | 95% {fmt(r['serving_95_s'])} | 100% "
              f"{fmt(r['serving_100_s'])}   (baseline: rollout-rate floor "
              f"{fmt(r['rollout_floor_s'])} for the fleet job alone)")
        print(f"  per device: {r['msgs_out_per_device']:.1f} msgs / {r['bytes_out_per_device']:.0f} B "
              f"up, {r['msgs_in_per_device']:.1f} msgs / {r['bytes_in_per_device']:.0f} B down, "
              f"{r['download_bytes_per_device']:.0f} B downloaded   (baseline: protocol floor "
              f"{PROTOCOL_FLOOR_MESSAGES} msgs)")
        print(f"  bridge CPU {r['bridge_cpu_per_device_ms']:.1f} ms/device above idle (idle over the "
              f"same wall time: {r['bridge_idle_cpu_same_wall_ms_per_device']:.1f} ms/device); "
              f"mosquitto {r['broker_cpu_per_device_ms']:.1f} ms/device")
        print(f"  {r['crashes_recovered']} crash(es) mid-install recovered")
        print(f"v2 bad release: aborted after {fmt(r['abort_s'])} ({r['abort_reason']}); fleet back "
              f"on v1 after {fmt(r['rollback_s'])}; {r['devices_that_ran_v2']} device(s) ever ran "
              f"v2 (all canary)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
