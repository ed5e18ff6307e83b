"""The anomaly story: stream, first model, a drift the next training learns, injected faults."""

from __future__ import annotations

import time
from typing import Any

from chalicelib.registry import Status
from mledge_devstack.demo.record import DECIDED, Snapshot, iso_to_epoch
from mledge_devstack.demo.run import Demo


def tell(demo: Demo) -> None:
    assert demo.fleet is not None
    n = len(demo.fleet.devices)
    demo.stage("1 stream", "no model yet: every reading goes up; the first training "
               f"starts after {demo.model.min_new_records} new records")
    first = demo.wait_for(
        "first training and its gate decision",
        lambda s: next((r for r in s.versions.values() if r.status in DECIDED), None),
        progress=demo.data_progress)
    if first.status != Status.REJECTED:
        demo.event(demo.display.bad(f"  note: the first model was {first.status}, "
                                    "not rejected (check demo/pipeline.toml)"))

    demo.stage("2 learn", "more data arrives; a retrain must pass the gate and reach "
               "every device (full model: nothing to patch yet)")
    first_release = demo.wait_for(
        "first release installed on every device",
        lambda s: next((r.version for r in s.released() if s.count_serving(r.version) == n),
                       None),
        progress=demo.rollout_progress(
            lambda s: max((r.version for r in s.released()), default=None)))
    demo.record_release(first_release)

    demo.stage("3 steady", f"v{first_release} serves on every device: only anomalies, "
               f"a {demo.model.uplink.sample_rate:.0%} sample and summaries go up")
    demo.fleet.set_control(phase="steady")
    steady_until = time.monotonic() + demo.options.steady_seconds
    # Retrains started on data sent before the model arrived are decided first (the
    # gate compares them with what the fleet runs); the shift waits for a quiet fleet.
    current = demo.wait_for(
        "the fleet runs one model and no training is in flight",
        lambda s: _quiet_release(demo, s, steady_until),
        progress=lambda s: (None, "measuring the uplink with a model; "
                            + ("waiting for the training in flight"
                               if s.in_flight() else "fleet on one model")))
    if current != first_release:
        demo.record_release(current)

    shift_at = time.time()
    demo.marks["shift"] = demo.elapsed()
    demo.stage("4 shift", "the line adds a high-speed product (250 Hz shaft) half the time: "
               f"v{current} flags those readings and sends them; they trigger a retrain")
    demo.fleet.set_control(phase="shift", regime="shifted")
    final_release = demo.wait_for(
        "a release trained on the new regime installed on every device",
        lambda s: next((r.version for r in s.released()
                        if (iso_to_epoch(r.created_at) or 0) > shift_at
                        and s.count_serving(r.version) == n), None),
        progress=demo.rollout_progress(
            lambda s: max((r.version for r in s.released()
                           if (iso_to_epoch(r.created_at) or 0) > shift_at), default=None)))
    demo.record_release(final_release)

    demo.stage("5 faults", f"faults injected in {demo.options.fault_rate:.0%} of readings: "
               f"v{final_release} flags them on the device")
    demo.marks["faults"] = demo.elapsed()
    demo.fleet.set_control(phase="faults", fault_rate=demo.options.fault_rate)
    target = demo.options.fault_readings_per_device
    recorded = {final_release}

    def fault_readings(snap: Snapshot) -> int:
        current = _current_release(snap)
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
        current = _current_release(snap)
        if current is not None and current not in recorded and \
                snap.count_serving(current) == n:
            recorded.add(current)
            demo.record_release(current)
        if not labelled and fault_readings(snap) >= target // 2:
            labelled.update(_label(demo, snap))
        if labelled and "version" not in labelled and not snap.in_flight():
            labelled.update(_retrain(demo))
        retrained = labelled.get("version")
        return (retrained is not None and retrained in snap.versions
                and not snap.in_flight() and current in recorded
                and fault_readings(snap) >= target)

    demo.wait_for("every device reads with faults injected; no training in flight",
                  lambda s: finished(s) or None,
                  progress=lambda s: (fault_readings(s) / target,
                                      f"{fault_readings(s)}/{target} readings per device"
                                      + ("; a retrain is in flight" if s.in_flight() else "")))
    demo.stage("done", "stopping")

def _operator(demo: Demo) -> Any:
    from chalicelib.operator import Operator

    assert demo.stack is not None
    return Operator(clients=demo.stack.clients, settings=demo.stack.settings, config=demo.config)


def _label(demo: Demo, snap: Snapshot) -> dict[str, Any]:
    """Play the operator: confirm half of the fault readings the fleet sent as faults
    (`mledge label`). The next training sees the faults at their true rate (records
    are weighted by 1 / inclusion_p), keeps the confirmed ones out of its training
    data, and the gate refuses it if it flags fewer of them than the fleet's model."""
    sent = sorted(snap.fault_ids())
    chosen = sent[::2]
    if chosen:
        _operator(demo).label(demo.model_name, chosen, "fault",
                              reason="demo operator: confirmed on site", actor="demo-operator")
    demo.event(f"  operator: {len(chosen)} of {len(sent)} fault readings sent labelled "
               "'fault' (mledge label)")
    demo.labels = {"fault_readings_sent": len(sent), "labelled": len(chosen)}
    return dict(demo.labels)


def _retrain(demo: Demo) -> dict[str, Any]:
    """`mledge train` once nothing is in flight, so the training includes the labels."""
    from chalicelib.trigger import TriggerError

    try:
        started = _operator(demo).train(demo.model_name, reason="operator: faults labelled",
                                        force=True)
    except TriggerError as exc:  # e.g. a training that the trigger just started
        demo.event(f"  operator: retrain not started yet ({exc})")
        return {}
    demo.event(f"  operator: retrain v{started.version} requested (mledge train)")
    demo.labels["retrain_version"] = started.version
    return {"version": started.version}


def _current_release(snap: Snapshot) -> int | None:
    released = [r.version for r in snap.versions.values() if r.status == Status.RELEASED]
    return released[0] if released else None

def _quiet_release(demo: Demo, snap: Snapshot, steady_until: float) -> int | None:
    if snap.in_flight() or time.monotonic() < steady_until:
        return None
    released = [r for r in snap.versions.values() if r.status == Status.RELEASED]
    if not released:
        return None
    current = released[0].version
    return current if snap.count_serving(current) == len(snap.devices) else None
