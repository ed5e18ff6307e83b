"""The digits story: the fleet classifies, an operator-started retraining, the release."""

from __future__ import annotations

import functools

from chalicelib.registry import Status, VersionRecord
from mledge_devstack.demo.record import DECIDED, DemoError, Snapshot, failing_reasons
from mledge_devstack.demo.run import DIGITS_TOTAL, Demo


def tell(demo: Demo) -> None:
    assert demo.fleet is not None and demo.stack is not None
    from chalicelib.operator import Operator

    n = len(demo.fleet.devices)
    operator = Operator(clients=demo.stack.clients, settings=demo.stack.settings,
                        config=demo.config)
    consumed = 0
    decisions: list[VersionRecord] = []
    for share, label in ((0.10, "10 %"), (0.70, "70 %")):
        limit = int(DIGITS_TOTAL * share)
        demo.fleet.set_control(phase=f"stream-{int(share * 100)}", digits_limit=limit)
        demo.stage(f"stream {label}", f"devices send the first {label} of the digits "
                   f"({limit} images) with their labels")
        need = limit - consumed
        demo.wait_for(f"{limit} images stored in S3", functools.partial(_stored, need),
                      progress=functools.partial(_stored_progress, need))
        demo.stage(f"train {label}", f"the operator starts a training on {label} "
                   "(`mledge train digits`)")
        start = operator.train(demo.model_name, reason=f"demo: operator trains on {label}")
        consumed = limit
        version = start.version
        decisions.append(demo.wait_for(
            f"v{version}'s gate decision", functools.partial(_decided, version),
            progress=functools.partial(_training_progress, version)))
    released = decisions[-1]
    if released.status == Status.REJECTED:
        raise DemoError(f"the 70 % model v{released.version} was rejected: "
                        + "; ".join(failing_reasons(released)))
    demo.stage("release", f"v{released.version} goes to every device")
    demo.wait_for("every device serves the classifier",
                  lambda s: s.count_serving(released.version) == n or None,
                  progress=demo.rollout_progress(lambda s: released.version))
    demo.record_release(released.version)
    demo.stage("classify", "devices classify the remaining 30 % locally "
               f"(send a {demo.model.uplink.sample_rate:.0%} sample and summaries)")
    demo.marks["classify"] = demo.elapsed()
    demo.fleet.set_control(phase="classify", digits_limit=DIGITS_TOTAL)
    left = DIGITS_TOTAL - int(DIGITS_TOTAL * 0.70)

    def classified(snap: Snapshot) -> int:
        return sum(int(((st.get("demo") or {}).get(f"classify/v{released.version}") or {})
                       .get("readings", 0)) for st in snap.devices.values())

    demo.wait_for("the remaining images classified on the devices",
                  lambda s: classified(s) >= left or None,
                  progress=lambda s: (classified(s) / left,
                                      f"{classified(s)}/{left} images classified on devices"))
    demo.stage("done", "stopping")

# ------------------------------------------------------------------ records


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
