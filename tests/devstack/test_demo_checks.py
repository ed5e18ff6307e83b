"""The demo's new checks, on hand-made phase tallies (the e2e test runs the real story)."""

from __future__ import annotations

from typing import Any

from mledge_devstack.demo.report import _checks, _detection


def _phase(version: int, faults: int, flagged: int, phase: str = "faults") -> dict[str, Any]:
    return {"phase": phase, "version": version,
            "kinds": {"fault": {"predicted": faults, "flagged": flagged, "readings": faults},
                      "normal": {"predicted": 500, "flagged": 2, "readings": 500}}}


def _training(version: int, reasons: list[str]) -> dict[str, Any]:
    return {"version": version, "status": "REJECTED", "gate": {"reasons": reasons}}


def _check(checks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in checks if c["name"] == name)


def test_detection_per_version_adds_up_phases() -> None:
    rows = _detection([_phase(3, 40, 40, "shift"), _phase(3, 60, 57), _phase(4, 50, 10),
                       _phase(0, 30, 0, "stream")])
    assert rows == [{"version": 3, "fault_readings": 100, "flagged": 97, "rate": 0.97},
                    {"version": 4, "fault_readings": 50, "flagged": 10, "rate": 0.2}]


def test_a_release_flagging_fewer_faults_fails_the_demo() -> None:
    worse = _checks("anomaly", [], [], {}, [], _detection([_phase(3, 60, 60), _phase(4, 60, 12)]))
    check = _check(worse, "no released model flags fewer faults than its predecessor")
    assert not check["passed"] and check["detail"] == "v4 20% < v3 100%"
    fine = _checks("anomaly", [], [], {}, [], _detection([_phase(3, 60, 60), _phase(4, 60, 59)]))
    assert _check(fine, "no released model flags fewer faults than its predecessor")["passed"]
    # too few fault readings to measure a version: not judged
    few = _checks("anomaly", [], [], {}, [], _detection([_phase(3, 60, 60), _phase(4, 5, 0)]))
    assert _check(few, "no released model flags fewer faults than its predecessor")["passed"]


def test_a_stale_champion_rejection_fails_the_demo() -> None:
    stale = [_training(5, ["champion scored was v2, but the fleet now runs v4: FAIL"]),
             _training(6, ["a model is in production but metrics.json has no champion "
                           "score: the challenger was never compared to it: FAIL"]),
             _training(7, ["silhouette 0.4 < champion 0.5 + min_improvement 0.05: FAIL"]),
             _training(1, ["no champion scored (first model of this model): threshold only: "
                           "pass"])]
    check = _check(_checks("anomaly", stale, [], {}, []),
                   "no training rejected for a stale or missing champion")
    assert not check["passed"] and check["detail"] == "v5, v6"
