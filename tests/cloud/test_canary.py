"""The canary verdict (chalicelib/canary.judge): a pure function of the canary's executions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chalicelib.canary import ABORT, PROMOTE, WAIT, DeviceHealth, judge
from chalicelib.config import CanaryConfig

LIMITS = CanaryConfig(thing_group="canary", min_reports=3, max_failure_percent=20.0,
                      max_error_rate=0.01, max_anomaly_rate=0.2, max_latency_ms=50.0,
                      max_wait_minutes=30)


def healthy(name: str, **changes: float) -> DeviceHealth:
    figures = {"health_error_rate": "0", "health_anomaly_rate": "0.01",
               "health_latency_p95_ms": "1.5"}
    figures.update({f"health_{k}": str(v) for k, v in changes.items()})
    return DeviceHealth.from_execution(name, "SUCCEEDED", figures)


def test_promotes_once_enough_healthy_reports_arrive():
    assert judge([healthy("a"), healthy("b")], LIMITS, age_minutes=1).decision == WAIT
    verdict = judge([healthy("a"), healthy("b"), healthy("c"),
                     DeviceHealth("d", "IN_PROGRESS")], LIMITS, age_minutes=1)
    assert verdict.decision == PROMOTE and verdict.figures["reports"] == 3


@pytest.mark.parametrize("change,word", [
    ({"anomaly_rate": 0.9}, "anomaly rate"),
    ({"error_rate": 0.5}, "error rate"),
    ({"latency_p95_ms": 400.0}, "latency"),
])
def test_one_report_over_a_limit_aborts(change, word):
    verdict = judge([healthy("a"), healthy("b"), healthy("c", **change)], LIMITS, age_minutes=1)
    assert verdict.decision == ABORT and word in verdict.reason and "c:" in verdict.reason


def test_failures_above_the_share_abort_and_below_do_not():
    few = [healthy(f"h{i}") for i in range(4)] + [DeviceHealth("f", "REJECTED")]
    assert judge(few, LIMITS, age_minutes=1).decision == PROMOTE  # 1 of 5: 20%, not above
    many = [*few, DeviceHealth("g", "TIMED_OUT")]
    verdict = judge(many, LIMITS, age_minutes=1)
    assert verdict.decision == ABORT and "REJECTED, TIMED_OUT" in verdict.reason


def test_no_verdict_in_time_aborts_and_a_canceled_job_aborts():
    assert judge([healthy("a")], LIMITS, age_minutes=31).decision == ABORT
    assert judge([], LIMITS, age_minutes=0, job_status="CANCELED",
                 job_reason="ABORTED").decision == ABORT


def test_a_success_without_health_figures_is_not_a_report():
    bare = DeviceHealth.from_execution("a", "SUCCEEDED", {"stage": "installed"})
    assert not bare.reported
    garbage = DeviceHealth.from_execution("b", "SUCCEEDED", {"health_error_rate": "lots"})
    assert not garbage.reported
    nan = healthy("n", anomaly_rate=float("nan"))
    assert not nan.reported  # nan passes every `>` check: never a healthy report
    assert judge([bare, garbage], LIMITS, age_minutes=1).decision == WAIT


# Health figures come from devices: any strings must give a verdict, never an exception.
@given(st.lists(st.tuples(st.sampled_from(["SUCCEEDED", "FAILED", "REJECTED", "IN_PROGRESS"]),
                          st.dictionaries(st.sampled_from(["health_error_rate",
                                                           "health_anomaly_rate",
                                                           "health_latency_p95_ms"]),
                                          st.text(max_size=6) | st.floats().map(str))),
                max_size=8),
       st.floats(0, 100))
def test_any_reported_strings_give_a_verdict(executions, age):
    devices = [DeviceHealth.from_execution(f"t{i}", status, details)
               for i, (status, details) in enumerate(executions)]
    verdict = judge(devices, LIMITS, age_minutes=age)
    assert verdict.decision in (PROMOTE, ABORT, WAIT)
    if verdict.decision == PROMOTE:
        assert sum(d.reported for d in devices) >= LIMITS.min_reports
