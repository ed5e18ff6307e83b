"""The IoT Jobs engine and the topic rule, on moto's real IoT backend in memory (no processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
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
        job_executions_rollout_config={}, document_parameters={},
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
