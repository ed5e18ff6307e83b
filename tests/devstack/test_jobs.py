"""The IoT Jobs engine and the topic rule, on moto's real IoT backend in memory (no processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mledge_devstack.jobs import JobsEngine, Outgoing, parse_presigned_source
from mledge_devstack.topic_rule import apply_topic_rule
from moto.iot.models import IoTBackend

from tests.fakes import FakeClock

REGION, ACCOUNT = "us-east-1", "123456789012"
PLACEHOLDER = "${aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws.com/bkt/releases/m/v00002/model.onnx.zst}"


@pytest.fixture
def backend() -> IoTBackend:
    iot = IoTBackend(REGION, ACCOUNT)
    iot.create_thing_group("fleet", None, {})
    for name in ("dev-a", "dev-b"):
        iot.create_thing(name, None, {})
        iot.add_thing_to_thing_group("fleet", None, name, None)
    return iot


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def engine(backend: IoTBackend, clock: FakeClock) -> JobsEngine:
    return JobsEngine(backend, lambda b, k, e: f"http://moto/{b}/{k}?expires={e}", clock=clock)


def create_job(backend: IoTBackend, job_id: str, *, targets: list[str] | None = None,
               **config: Any) -> None:
    group_arn = backend.describe_thing_group("fleet").arn
    backend.create_job(
        job_id=job_id, targets=targets or [group_arn], document_source="",
        document=json.dumps({"operation": "mledge.model-update", "full": {"url": PLACEHOLDER}}),
        description="", presigned_url_config={"expiresInSec": 600},
        target_selection=config.pop("target_selection", "SNAPSHOT"),
        job_executions_rollout_config=config.pop("rollout", {}), document_parameters={},
        abort_config=config.pop("abort_config", {}),
        job_execution_retry_config=config.pop("retry_config", {}),
        scheduling_config={}, timeout_config=config.pop("timeout_config", {}),
    )


def request(engine: JobsEngine, thing: str, tail: str, body: dict[str, Any]) -> list[Outgoing]:
    return engine.handle(f"$aws/things/{thing}/jobs/{tail}", json.dumps(body).encode())


def reply(messages: list[Outgoing], suffix: str) -> dict[str, Any]:
    found = [m.payload for m in messages if m.topic.endswith(suffix)]
    assert len(found) == 1, [m.topic for m in messages]
    return found[0]


def test_group_target_expands_to_one_execution_per_thing_with_notify_next(engine, backend):
    create_job(backend, "job-1")
    out = engine.sync()
    topics = sorted(m.topic for m in out)
    assert topics == ["$aws/things/dev-a/jobs/notify-next", "$aws/things/dev-b/jobs/notify-next"]
    execution = out[0].payload["execution"]
    assert execution["jobId"] == "job-1" and execution["status"] == "QUEUED"
    assert execution["versionNumber"] == 1 and execution["executionNumber"] == 1
    assert execution["jobDocument"]["full"]["url"] == (
        "http://moto/bkt/releases/m/v00002/model.onnx.zst?expires=600")
    # The IoT API (moto's backend) now reports the executions and the job's counts.
    listed = backend.list_job_executions_for_job("job-1", None)[0]
    assert sorted((ex.thing_arn.rsplit("/", 1)[-1], ex.status) for ex in listed) == [
        ("dev-a", "QUEUED"), ("dev-b", "QUEUED")]
    assert backend.describe_job("job-1").job_process_details["numberOfQueuedThings"] == 2
    assert engine.sync() == []  # nothing changed: no repeated notification


def test_start_next_update_and_version_checks(engine, backend):
    create_job(backend, "job-1")
    engine.sync()
    started = reply(request(engine, "dev-a", "start-next",
                            {"clientToken": "t1", "statusDetails": {"step": "download"}}),
                    "start-next/accepted")
    assert started["clientToken"] == "t1"
    ex = started["execution"]
    assert (ex["status"], ex["versionNumber"], ex["thingName"]) == ("IN_PROGRESS", 2, "dev-a")
    assert ex["statusDetails"] == {"step": "download"} and "startedAt" in ex

    stale = reply(request(engine, "dev-a", "job-1/update",
                          {"status": "SUCCEEDED", "expectedVersion": 1}), "job-1/update/rejected")
    assert stale["code"] == "VersionMismatch"
    assert stale["executionState"] == {"status": "IN_PROGRESS", "statusDetails": {"step": "download"},
                                       "versionNumber": 2}

    out = request(engine, "dev-a", "job-1/update",
                  {"status": "SUCCEEDED", "expectedVersion": 2, "includeJobExecutionState": True,
                   "statusDetails": {"installed": "2"}})
    assert reply(out, "job-1/update/accepted")["executionState"] == {
        "status": "SUCCEEDED", "statusDetails": {"installed": "2"}, "versionNumber": 3}
    assert reply(out, "notify-next") == {"timestamp": 1_800_000_000}  # nothing pending now

    again = reply(request(engine, "dev-a", "job-1/update", {"status": "IN_PROGRESS"}),
                  "job-1/update/rejected")
    assert again["code"] == "InvalidStateTransition"
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "SUCCEEDED"


def test_rejections_for_bad_requests(engine, backend):
    create_job(backend, "job-1")
    engine.sync()
    assert reply(engine.handle("$aws/things/dev-a/jobs/start-next", b"{nope"),
                 "rejected")["code"] == "InvalidJson"
    assert reply(request(engine, "dev-a", "job-9/update", {"status": "SUCCEEDED"}),
                 "rejected")["code"] == "ResourceNotFound"
    assert reply(request(engine, "dev-a", "job-1/update", {"status": "CANCELED"}),
                 "rejected")["code"] == "InvalidRequest"
    too_many = {f"k{i}": "v" for i in range(11)}
    assert reply(request(engine, "dev-a", "job-1/update",
                         {"status": "IN_PROGRESS", "statusDetails": too_many}),
                 "rejected")["code"] == "InvalidRequest"


def test_get_pending_and_describe_next(engine, backend, clock):
    create_job(backend, "job-1")
    clock.now += 1
    create_job(backend, "job-2")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    pending = reply(request(engine, "dev-a", "get", {}), "get/accepted")
    assert [j["jobId"] for j in pending["inProgressJobs"]] == ["job-1"]
    assert [j["jobId"] for j in pending["queuedJobs"]] == ["job-2"]
    described = reply(request(engine, "dev-a", "$next/get", {"includeJobDocument": False}),
                      "accepted")["execution"]
    assert described["jobId"] == "job-1" and "jobDocument" not in described


def test_cancel_job_cancels_queued_and_keeps_in_progress(engine, backend):
    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    backend.cancel_job("job-1", reason_code=None, comment="stop", force=False)
    out = engine.sync()
    assert backend.describe_job_execution("job-1", "dev-b", None).status == "CANCELED"
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "IN_PROGRESS"
    assert [m.topic for m in out] == ["$aws/things/dev-b/jobs/notify-next"]
    assert "execution" not in out[0].payload


def test_cancel_job_execution_through_the_api_notifies_the_thing(engine, backend):
    create_job(backend, "job-1")
    engine.sync()
    backend.cancel_job_execution("job-1", "dev-b", force=False)
    out = engine.sync()
    assert [m.topic for m in out] == ["$aws/things/dev-b/jobs/notify-next"]
    assert reply(request(engine, "dev-b", "job-1/update", {"status": "IN_PROGRESS"}),
                 "rejected")["code"] == "InvalidStateTransition"


def test_failed_execution_is_retried_as_a_new_execution_number(engine, backend):
    create_job(backend, "job-1", retry_config={"criteriaList": [
        {"failureType": "FAILED", "numberOfRetries": 1}]})
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    out = request(engine, "dev-a", "job-1/update", {"status": "FAILED"})
    again = reply(out, "notify-next")["execution"]
    assert (again["status"], again["executionNumber"], again["versionNumber"]) == ("QUEUED", 2, 1)
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    request(engine, "dev-a", "job-1/update", {"status": "FAILED"})
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "FAILED"


def test_abort_config_cancels_the_rest_of_the_rollout(engine, backend):
    backend.create_thing("dev-c", None, {})
    backend.add_thing_to_thing_group("fleet", None, "dev-c", None)
    create_job(backend, "job-1", abort_config={"criteriaList": [
        {"failureType": "REJECTED", "action": "CANCEL", "thresholdPercentage": 50.0,
         "minNumberOfExecutedThings": 1}]})
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    request(engine, "dev-a", "job-1/update", {"status": "REJECTED"})
    job = backend.describe_job("job-1")
    assert job.status == "CANCELED" and job.reason_code == "ABORTED"
    assert {t: backend.describe_job_execution("job-1", t, None).status
            for t in ("dev-a", "dev-b", "dev-c")} == {
        "dev-a": "REJECTED", "dev-b": "CANCELED", "dev-c": "CANCELED"}


def test_step_timeout_times_out_the_execution(engine, backend, clock):
    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {"stepTimeoutInMinutes": 1}), "accepted")
    clock.now += 30
    engine.sync()
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "IN_PROGRESS"
    clock.now += 31
    engine.sync()
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "TIMED_OUT"


def test_job_completes_when_every_execution_is_terminal(engine, backend):
    create_job(backend, "job-1", targets=[backend.describe_thing("dev-a").arn])
    engine.sync()
    assert backend.describe_job("job-1").status == "IN_PROGRESS"
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    request(engine, "dev-a", "job-1/update", {"status": "SUCCEEDED"})
    job = backend.describe_job("job-1")
    assert job.status == "COMPLETED"
    assert job.job_process_details["numberOfSucceededThings"] == 1


def test_continuous_job_reaches_things_added_later(engine, backend):
    create_job(backend, "job-1", target_selection="CONTINUOUS")
    engine.sync()
    backend.create_thing("dev-late", None, {})
    backend.add_thing_to_thing_group("fleet", None, "dev-late", None)
    out = engine.sync()
    assert [m.topic for m in out] == ["$aws/things/dev-late/jobs/notify-next"]


@pytest.mark.parametrize("url,expected", [
    ("https://s3.us-east-1.amazonaws.com/bkt/releases/m/v00002/a%3Db.zst", ("bkt", "releases/m/v00002/a=b.zst")),
    ("https://bkt.s3.amazonaws.com/k/x.onnx", ("bkt", "k/x.onnx")),
    ("https://bkt.s3.eu-west-1.amazonaws.com/k/x.onnx", ("bkt", "k/x.onnx")),
])
def test_presigned_placeholder_sources(url, expected):
    assert parse_presigned_source(url) == expected


def test_topic_rule_projection():
    record = apply_topic_rule("dt/mledge/vibration-anomaly/dev-a/telemetry",
                              b'{"id": "dev-a-1", "features": [1.0], "thing": "spoofed"}', 1234)
    assert record == {"id": "dev-a-1", "features": [1.0], "model": "vibration-anomaly",
                      "thing": "dev-a", "type": "telemetry", "received_at": 1234}
    assert apply_topic_rule("dt/mledge/m/dev-a/telemetry", b"not json", 1) is None
    assert apply_topic_rule("dt/other/m/dev-a/telemetry", b"{}", 1) is None


# ------------------------------------------------------- differences from AWS, fixed


@pytest.mark.parametrize("bad", ["2", 2.5, True, [2], {"v": 2}])
def test_non_integer_expected_version_gets_a_rejected_reply(engine, backend, bad):
    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    rejected = reply(request(engine, "dev-a", "job-1/update",
                             {"status": "SUCCEEDED", "expectedVersion": bad, "clientToken": "c"}),
                     "job-1/update/rejected")
    assert rejected["code"] == "InvalidRequest" and rejected["clientToken"] == "c"
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "IN_PROGRESS"


@pytest.mark.parametrize("body", [
    {"status": "IN_PROGRESS", "statusDetails": {"step": "x"}, "stepTimeoutInMinutes": 0},
    {"status": "SUCCEEDED", "statusDetails": {"step": "x"}, "expectedVersion": 1},
    {"status": "SUCCEEDED", "statusDetails": {"step": "x"}, "executionNumber": "one"},
    {"status": "FAILED", "statusDetails": {"step": "x"}, "stepTimeoutInMinutes": "5"},
])
def test_a_rejected_update_changes_nothing(engine, backend, body):
    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {"statusDetails": {"step": "start"}}), "accepted")
    before = backend.describe_job_execution("job-1", "dev-a", None)
    state = (before.status, dict(before.status_details_map), before.version_number,
             before.last_updated_at)
    reply(request(engine, "dev-a", "job-1/update", body), "job-1/update/rejected")
    after = backend.describe_job_execution("job-1", "dev-a", None)
    assert (after.status, dict(after.status_details_map), after.version_number,
            after.last_updated_at) == state


def test_a_terminal_execution_cannot_be_cancelled(engine, backend):
    from moto.iot.exceptions import InvalidStateTransitionException

    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    request(engine, "dev-a", "job-1/update", {"status": "SUCCEEDED"})
    with pytest.raises(InvalidStateTransitionException):
        backend.cancel_job_execution("job-1", "dev-a", force=True)
    engine.sync()
    assert backend.describe_job_execution("job-1", "dev-a", None).status == "SUCCEEDED"
    backend.cancel_job_execution("job-1", "dev-b", force=False)  # QUEUED: allowed
    engine.sync()
    assert backend.describe_job_execution("job-1", "dev-b", None).status == "CANCELED"


def test_a_retried_executions_earlier_attempts_stay_describable(engine, backend):
    create_job(backend, "job-1", retry_config={"criteriaList": [
        {"failureType": "FAILED", "numberOfRetries": 1}]})
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    request(engine, "dev-a", "job-1/update",
            {"status": "FAILED", "statusDetails": {"reason": "network"}})
    # The retry is execution 2; execution 1 is still there, FAILED, over both APIs.
    first = backend.describe_job_execution("job-1", "dev-a", 1)
    assert (first.status, first.execution_number, first.status_details_map) == (
        "FAILED", 1, {"reason": "network"})
    assert backend.describe_job_execution("job-1", "dev-a", 2).status == "QUEUED"
    assert backend.describe_job_execution("job-1", "dev-a", None).execution_number == 2
    described = reply(request(engine, "dev-a", "job-1/get", {"executionNumber": 1}),
                      "job-1/get/accepted")["execution"]
    assert (described["status"], described["executionNumber"]) == ("FAILED", 1)
    assert described["statusDetails"] == {"reason": "network"}
    stale = reply(request(engine, "dev-a", "job-1/update",
                          {"status": "SUCCEEDED", "executionNumber": 1}), "job-1/update/rejected")
    assert stale["code"] == "InvalidStateTransition"
    assert backend.describe_job_execution("job-1", "dev-a", 2).status == "QUEUED"


def test_jobs_created_in_the_same_second_are_served_in_creation_order(engine, backend):
    # Names sort the other way round, and both jobs are picked up in the same sync.
    for job_id in ("job-z", "job-m", "job-a"):
        create_job(backend, job_id)
    engine.sync()
    served = []
    for _ in range(3):
        ex = reply(request(engine, "dev-a", "start-next", {}), "start-next/accepted")["execution"]
        served.append(ex["jobId"])
        request(engine, "dev-a", f"{ex['jobId']}/update", {"status": "SUCCEEDED"})
    assert served == ["job-z", "job-m", "job-a"]
    pending = reply(request(engine, "dev-b", "get", {}), "get/accepted")
    assert [j["jobId"] for j in pending["queuedJobs"]] == ["job-z", "job-m", "job-a"]


# ------------------------------------------------------------- rollout and abort


def add_things(backend: IoTBackend, count: int) -> list[str]:
    names = [f"dev-{i:03d}" for i in range(count)]
    for name in names:
        backend.create_thing(name, None, {})
        backend.add_thing_to_thing_group("fleet", None, name, None)
    return names


def executions(backend: IoTBackend, job_id: str) -> dict[str, str]:
    return {ex.thing_arn.rsplit("/", 1)[-1]: ex.status
            for ex in backend.list_job_executions_for_job(job_id, None)[0]}


def succeed(engine: JobsEngine, thing: str, job_id: str) -> None:
    reply(request(engine, thing, "start-next", {}), "start-next/accepted")
    reply(request(engine, thing, f"{job_id}/update", {"status": "SUCCEEDED"}), "update/accepted")


def test_maximum_per_minute_limits_the_things_reached_each_minute(engine, backend, clock):
    add_things(backend, 8)  # 10 things with dev-a and dev-b
    create_job(backend, "job-1", rollout={"maximumPerMinute": 3})
    out = engine.sync()
    assert len(executions(backend, "job-1")) == 3 and len(out) == 3  # one notify-next each
    assert backend.describe_job("job-1").status == "IN_PROGRESS"
    clock.now += 59
    assert engine.sync() == [] and len(executions(backend, "job-1")) == 3
    clock.now += 2
    engine.sync()
    assert len(executions(backend, "job-1")) == 6
    for _ in range(2):
        clock.now += 61
        engine.sync()
    assert len(executions(backend, "job-1")) == 10
    # Not COMPLETED while the rollout still has things to reach.
    assert backend.describe_job("job-1").status == "IN_PROGRESS"


def test_exponential_rate_grows_with_succeeded_things_up_to_the_maximum(engine, backend, clock):
    add_things(backend, 28)  # 30 things
    create_job(backend, "job-1", rollout={
        "maximumPerMinute": 8,
        "exponentialRate": {"baseRatePerMinute": 2, "incrementFactor": 2.0,
                            "rateIncreaseCriteria": {"numberOfSucceededThings": 2}}})
    engine.sync()
    first = executions(backend, "job-1")
    assert len(first) == 2  # the base rate
    for thing in first:
        succeed(engine, thing, "job-1")
    engine.sync()  # 2 succeeded: 4 a minute, 2 of them already used in this minute
    assert len(executions(backend, "job-1")) == 4
    clock.now += 61
    engine.sync()
    assert len(executions(backend, "job-1")) == 8
    for thing, status in list(executions(backend, "job-1").items()):
        if status == "QUEUED":
            succeed(engine, thing, "job-1")
    engine.sync()  # the rollout moves on the 1 s tick, not on device requests
    # 8 succeeded: 2 * 2**4 = 32 a minute, capped at maximumPerMinute = 8 in this minute.
    assert len(executions(backend, "job-1")) == 4 + 8
    clock.now += 61
    engine.sync()
    assert len(executions(backend, "job-1")) == 4 + 8 + 8


def test_continuous_job_with_a_rate_reaches_each_thing_once(engine, backend, clock):
    add_things(backend, 8)
    create_job(backend, "job-1", target_selection="CONTINUOUS", rollout={"maximumPerMinute": 4})
    for _ in range(5):  # repeated syncs must not queue the waiting things again
        engine.sync()
    assert len(executions(backend, "job-1")) == 4
    clock.now += 61
    for _ in range(5):
        engine.sync()
    assert len(executions(backend, "job-1")) == 8
    backend.create_thing("dev-late", None, {})
    backend.add_thing_to_thing_group("fleet", None, "dev-late", None)
    clock.now += 61
    engine.sync()
    assert len(executions(backend, "job-1")) == 11
    assert all(status == "QUEUED" for status in executions(backend, "job-1").values())


def test_exponential_rate_by_notified_things(engine, backend, clock):
    add_things(backend, 18)  # 20 things
    create_job(backend, "job-1", rollout={
        "maximumPerMinute": 1000,
        "exponentialRate": {"baseRatePerMinute": 1, "incrementFactor": 2.0,
                            "rateIncreaseCriteria": {"numberOfNotifiedThings": 2}}})
    engine.sync()
    assert len(executions(backend, "job-1")) == 1  # 1 a minute until 2 are notified
    clock.now += 61
    engine.sync()  # the 2nd raises the rate to 2: a 3rd in the same minute
    assert len(executions(backend, "job-1")) == 3
    clock.now += 61
    engine.sync()  # 4 notified: 4/min, 6: 8/min, 10: 32/min: everyone
    assert len(executions(backend, "job-1")) == 20


def test_abort_counts_only_its_failure_type_after_the_minimum(engine, backend, clock):
    things = add_things(backend, 8)
    create_job(backend, "job-1", abort_config={"criteriaList": [
        {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 50.0,
         "minNumberOfExecutedThings": 4}]})
    engine.sync()
    for thing in things[:3]:  # three TIMED_OUT/REJECTED: not FAILED
        reply(request(engine, thing, "start-next", {}), "accepted")
        request(engine, thing, "job-1/update", {"status": "REJECTED"})
    assert backend.describe_job("job-1").status == "IN_PROGRESS"
    reply(request(engine, things[3], "start-next", {}), "accepted")
    request(engine, things[3], "job-1/update", {"status": "FAILED"})
    assert backend.describe_job("job-1").status == "IN_PROGRESS"  # 1 of 4 FAILED: 25 %
    for thing in things[4:7]:
        reply(request(engine, thing, "start-next", {}), "accepted")
        request(engine, thing, "job-1/update", {"status": "FAILED"})
    job = backend.describe_job("job-1")  # 4 of 7 FAILED: 57 %
    assert job.status == "CANCELED" and job.reason_code == "ABORTED"
    assert executions(backend, "job-1")[things[7]] == "CANCELED"


def test_abort_stops_the_rollout_reaching_anyone_else(engine, backend, clock):
    add_things(backend, 8)
    create_job(backend, "job-1", rollout={"maximumPerMinute": 2}, abort_config={"criteriaList": [
        {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 100.0,
         "minNumberOfExecutedThings": 2}]})
    engine.sync()
    for thing in list(executions(backend, "job-1")):
        reply(request(engine, thing, "start-next", {}), "accepted")
        request(engine, thing, "job-1/update", {"status": "FAILED"})
    assert backend.describe_job("job-1").status == "CANCELED"
    clock.now += 120
    engine.sync()
    assert len(executions(backend, "job-1")) == 2


def test_in_progress_timeout_times_out_and_counts_for_abort(engine, backend, clock):
    create_job(backend, "job-1", timeout_config={"inProgressTimeoutInMinutes": 2},
               abort_config={"criteriaList": [
                   {"failureType": "TIMED_OUT", "action": "CANCEL", "thresholdPercentage": 100.0,
                    "minNumberOfExecutedThings": 1}]})
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    clock.now += 119
    engine.sync()
    assert executions(backend, "job-1")["dev-a"] == "IN_PROGRESS"
    clock.now += 2
    engine.sync()
    assert executions(backend, "job-1") == {"dev-a": "TIMED_OUT", "dev-b": "CANCELED"}
    assert backend.describe_job("job-1").reason_code == "ABORTED"


# Device payloads come from outside: whatever an update carries, the device gets exactly
# one reply, and a rejected one leaves the execution exactly as it was.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
_update_bodies = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "x"])
    | _json_values,
    "expectedVersion": st.integers(0, 4) | _json_values,
    "executionNumber": st.integers(0, 3) | _json_values,
    "stepTimeoutInMinutes": st.integers(-2, 3) | _json_values,
    "statusDetails": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)
    | _json_values,
    "clientToken": st.text(max_size=8),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_update_bodies)
def test_any_update_gets_one_reply_and_a_rejection_changes_nothing(body):
    backend = IoTBackend(REGION, ACCOUNT)
    backend.create_thing_group("fleet", None, {})
    backend.create_thing("dev-a", None, {})
    backend.add_thing_to_thing_group("fleet", None, "dev-a", None)
    engine = JobsEngine(backend, lambda b, k, e: "url", clock=FakeClock(1_800_000_000.0))
    create_job(backend, "job-1")
    engine.sync()
    reply(request(engine, "dev-a", "start-next", {}), "accepted")
    ex = backend.describe_job_execution("job-1", "dev-a", None)
    before = (ex.status, dict(ex.status_details_map), ex.version_number, ex.last_updated_at)
    out = request(engine, "dev-a", "job-1/update", body)
    replies = [m for m in out if m.topic.endswith(("/accepted", "/rejected"))]
    assert len(replies) == 1
    if "clientToken" in body:
        assert replies[0].payload["clientToken"] == body["clientToken"]
    ex = backend.describe_job_execution("job-1", "dev-a", None)
    if replies[0].topic.endswith("/rejected"):
        assert replies[0].payload["code"] in ("InvalidRequest", "VersionMismatch",
                                              "InvalidStateTransition", "ResourceNotFound")
        assert (ex.status, dict(ex.status_details_map), ex.version_number,
                ex.last_updated_at) == before
    else:
        assert body.get("status") in ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")
        assert ex.status == body["status"] and ex.version_number == before[2] + 1
