"""The device's side of IoT Jobs with outside input: statusDetails AWS accepts, refused updates
handled, replies and config that never crash the agent, and a bridge as strict as AWS.

The agent's JobsClient talks to the real local bridge (`mledge_devstack.jobs.JobsEngine` on
moto's IoT backend) through `BridgeLink`, which plays mosquitto in-process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mledge_devstack.jobs import JobsEngine, Outgoing
from mledge_edge.agent import Agent
from mledge_edge.config import AgentConfig, ConfigError
from mledge_edge.jobs import JobExecution, JobReplyError, JobsClient
from mledge_edge.updater import status_details
from mledge_update.iot_jobs import (
    InvalidJobsRequestError,
    ascii_details,
    check_status_details,
    sanitize_detail_value,
    utf16_length,
)
from moto.iot.models import IoTBackend

from tests.devstack.test_jobs import ACCOUNT, REGION, create_job
from tests.edge.support import make_kmeans_model, release_keys_pem
from tests.fuzz_strategies import json_values, nasty_numbers, nasty_text

THING = "dev-a"


def _matches(topic_filter: str, topic: str) -> bool:
    pattern = re.escape(topic_filter).replace(r"\+", "[^/]+").replace(r"\#", ".*")
    return re.fullmatch(pattern, topic) is not None


class BridgeLink:
    """MqttLink's interface wired to the bridge: each publish is a request the JobsEngine
    answers, and its replies reach the matching subscriptions (what mosquitto does).

    `refuse(topic, request)` returns a reason to answer InvalidRequest instead, to play an
    AWS that is stricter than our reading of its docs.
    """

    def __init__(self, jobs_engine: JobsEngine,
                 refuse: Callable[[str, dict[str, Any]], str | None] | None = None) -> None:
        self.engine = jobs_engine
        self.refuse = refuse
        self.subscriptions: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> None:
        self.subscriptions.append((topic_filter, callback))

    def resubscribe(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes) -> None:
        request = json.loads(payload)
        self.requests.append((topic, request))
        why = self.refuse(topic, request) if self.refuse else None
        if why:
            out = [Outgoing(f"{topic}/rejected", {"code": "InvalidRequest", "message": why,
                                                  "clientToken": request.get("clientToken")})]
        else:
            out = self.engine.handle(topic, payload)
        for message in out:
            for topic_filter, callback in self.subscriptions:
                if _matches(topic_filter, message.topic):
                    callback(message.topic, json.dumps(message.payload).encode())


class Bridge:
    """A fresh bridge: moto's IoT backend with one thing in the fleet group, and its JobsEngine."""

    def __init__(self) -> None:
        self.backend = IoTBackend(REGION, ACCOUNT)
        self.backend.create_thing_group("fleet", None, {})
        self.backend.create_thing(THING, None, {})
        self.backend.add_thing_to_thing_group("fleet", None, THING, None)
        self.engine = JobsEngine(self.backend, lambda b, k, e: f"http://moto/{b}/{k}",
                                 clock=lambda: 1_800_000_000.0)

    def execution(self) -> Any:
        return self.backend.job_executions[("job-1", THING)]

    def snapshot(self) -> tuple[Any, ...]:
        ex = self.execution()
        meta = self.engine._meta[("job-1", THING)]
        return (ex.status, dict(ex.status_details_map), ex.version_number, ex.started_at,
                meta.step_deadline, meta.started)


@pytest.fixture
def bridge() -> Bridge:
    return Bridge()


def _started(bridge: Bridge, link: BridgeLink) -> tuple[JobsClient, JobExecution]:
    create_job(bridge.backend, "job-1")
    bridge.engine.sync()
    client = JobsClient(link, THING, lambda *_: None, request_timeout_s=1.0)
    client.subscribe()
    execution = client.start_next()
    assert execution is not None and execution.status == "IN_PROGRESS"
    return client, execution


def onnxruntime_error_text() -> str:
    """A real onnxruntime error message: it has newlines in it."""
    session = ort.InferenceSession(make_kmeans_model(1))
    with pytest.raises(Exception) as caught:
        session.run(None, {"input": np.zeros((1, 3), np.float32)})
    text = str(caught.value)
    assert "\n" in text
    return text


# ----------------------------------------------------- statusDetails AWS accepts


def test_onnxruntime_error_text_becomes_an_accepted_status_detail() -> None:
    details = status_details(stage="smoke", version=3, reason=onnxruntime_error_text())
    assert check_status_details(details) == details
    assert "\n" not in details["reason"] and "INVALID_ARGUMENT" in details["reason"]


@pytest.mark.parametrize(("details", "accepted"), [
    ({f"k{i}": "v" for i in range(10)}, True),
    ({f"k{i}": "v" for i in range(11)}, False),
    ({"k" * 128: "v"}, True),
    ({"k" * 129: "v"}, False),
    ({"a:b_c-D9": "v"}, True),
    ({"a.b": "v"}, False),
    ({"": "v"}, False),
    ({"k": "x" * 1024}, True),
    ({"k": "x" * 1025}, False),
    ({"k": "\U0001f600" * 512}, True),   # 1,024 UTF-16 units
    ({"k": "\U0001f600" * 513}, False),  # 1,026: Java counts a non-BMP character twice
    ({"k": ""}, False),
    ({"k": "line\n"}, False),             # Cc
    ({"k": "tab\there"}, False),          # Cc
    ({"k": "zero\u200bwidth"}, False),    # Cf
    ({"k": "private\ue000"}, False),      # Co
    ({"k": "unassigned\u0378"}, False),   # Cn
    ({"k": "lone\ud800"}, False),         # Cs
    ({"k": "line\u2028sep é ü 漢字 \U0001f600"}, True),  # Zl, letters, So: not category C
    ({"k": 5}, False),
    ({"k": None}, False),
    ([["k", "v"]], False),
    ("k=v", False),
])
def test_status_details_rules_are_aws_rules(details: Any, accepted: bool) -> None:
    if accepted:
        assert check_status_details(details) == details
    else:
        with pytest.raises(InvalidJobsRequestError):
            check_status_details(details)


@given(values=st.dictionaries(st.sampled_from(["stage", "version", "reason", "codec", "bytes",
                                               "a:b", "x_y-z"]),
                              st.one_of(nasty_text(2000), json_values(), nasty_numbers())))
def test_the_agent_only_builds_status_details_aws_accepts(values: dict[str, Any]) -> None:
    details = status_details(**values)
    assert check_status_details(details) == details
    assert check_status_details(ascii_details(details)) == ascii_details(details)


@given(value=st.one_of(nasty_text(3000), json_values()))
def test_sanitized_values_fit_and_keep_printable_text(value: Any) -> None:
    text = sanitize_detail_value(value)
    assert utf16_length(text) <= 1024
    if text:
        check_status_details({"k": text})
    if isinstance(value, str) and value.isascii() and value.isprintable() and value.strip() \
            and len(value) <= 1024:
        assert text == value.strip()


# ---------------------------------------------------------- the bridge is strict


@pytest.mark.parametrize("body", [
    {"status": "FAILED", "statusDetails": {"reason": "ends in a newline\n"}},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "v"}, "stepTimeoutInMinutes": 0},
    {"status": "IN_PROGRESS", "statusDetails": {"k": "v"}, "stepTimeoutInMinutes": "5"},
    {"status": "FAILED", "statusDetails": {"k": "v"}, "expectedVersion": "2"},
    {"status": "FAILED", "statusDetails": {"k": "v"}, "expectedVersion": 2.0},
    {"status": "FAILED", "expectedVersion": True},
    {"status": "FAILED", "expectedVersion": 2**63},
    {"status": "FAILED", "executionNumber": "1"},
    {"status": "FAILED", "includeJobExecutionState": "yes"},
    {"status": "FAILED", "statusDetails": {f"k{i}": "v" for i in range(11)}},
])
def test_bridge_answers_invalid_request_and_changes_nothing(bridge, body) -> None:
    _started(bridge, BridgeLink(bridge.engine))
    before = bridge.snapshot()
    out = bridge.engine.handle(f"$aws/things/{THING}/jobs/job-1/update",
                        json.dumps({**body, "clientToken": "t"}).encode())
    (reply,) = [m for m in out if m.topic.endswith("/rejected")]
    assert reply.payload["code"] == "InvalidRequest" and reply.payload["clientToken"] == "t"
    assert bridge.snapshot() == before


_update_body = st.fixed_dictionaries({}, optional={
    "status": st.one_of(st.sampled_from(["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED",
                                         "QUEUED", "CANCELED"]), json_values(2)),
    "statusDetails": st.one_of(json_values(3), st.dictionaries(
        st.one_of(st.sampled_from(["stage", "reason", "a:b"]), nasty_text(12)),
        st.one_of(nasty_text(), json_values(1)), max_size=12)),
    "expectedVersion": st.one_of(st.integers(0, 4), nasty_numbers(), json_values(1)),
    "executionNumber": st.one_of(st.just(1), nasty_numbers(), json_values(1)),
    "stepTimeoutInMinutes": st.one_of(st.sampled_from([-1, 0, 1, 10080, 10081]),
                                      nasty_numbers(), json_values(1)),
    "includeJobExecutionState": json_values(1),
    "includeJobDocument": json_values(1),
    "clientToken": json_values(1),
})


@given(body=_update_body)
def test_bridge_accepts_or_rejects_any_update_and_a_rejection_changes_nothing(
        body: dict[str, Any]) -> None:
    bridge = Bridge()
    _started(bridge, BridgeLink(bridge.engine))
    before = bridge.snapshot()
    try:
        payload = json.dumps(body).encode("utf-8", "surrogatepass")
    except ValueError:
        return  # a number past Python's digit limit: not sendable as JSON text
    out = bridge.engine.handle(f"$aws/things/{THING}/jobs/job-1/update", payload)
    replies = [m for m in out if m.topic.startswith(f"$aws/things/{THING}/jobs/job-1/update/")]
    assert len(replies) == 1
    if replies[0].topic.endswith("/rejected"):
        assert replies[0].payload["code"] in ("InvalidRequest", "InvalidJson", "VersionMismatch",
                                              "InvalidStateTransition", "ResourceNotFound")
        assert bridge.snapshot() == before
    else:
        check_status_details(bridge.execution().status_details_map or {"k": "v"})


@given(tail=st.sampled_from(["start-next", "get", "job-1/get", "$next/get", "job-1/update",
                             "no-such-job/update", "$next/update"]),
       payload=st.one_of(st.binary(max_size=40), st.just(b"[" * 50_000),
                         _update_body.map(lambda b: json.dumps(b).encode("utf-8", "surrogatepass")),
                         json_values().map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))))
def test_every_device_request_gets_exactly_one_answer(tail: str, payload: bytes) -> None:
    bridge = Bridge()
    _started(bridge, BridgeLink(bridge.engine))
    before = bridge.snapshot()
    topic = f"$aws/things/{THING}/jobs/{tail}"
    out = bridge.engine.handle(topic, payload)
    replies = [m for m in out if m.topic in (f"{topic}/accepted", f"{topic}/rejected")]
    assert len(replies) == 1, [m.topic for m in out]
    if replies[0].topic.endswith("/rejected"):
        assert replies[0].payload["code"] in ("InvalidRequest", "InvalidJson", "VersionMismatch",
                                              "InvalidStateTransition", "ResourceNotFound")
        assert bridge.snapshot() == before


# ------------------------------------------------ the agent handles a refusal


def _agent(tmp_path: Path) -> Agent:
    keys = tmp_path / "release-keys.pem"
    keys.write_bytes(release_keys_pem())
    return Agent(AgentConfig(thing=THING, model="vibration-anomaly", insecure_no_tls=True,
                             state_dir=str(tmp_path / "state"), sensor="none", rate=0,
                             release_keys=str(keys)))


def test_a_final_update_with_raw_onnxruntime_text_still_ends_the_execution(
        tmp_path, bridge) -> None:
    """Unsanitized details (as the agent used to send): the bridge refuses them like AWS, and
    the agent sends the status again with sanitized details instead of leaving it IN_PROGRESS."""
    link = BridgeLink(bridge.engine)
    client, execution = _started(bridge, link)
    reason = onnxruntime_error_text()
    _agent(tmp_path)._finish(client, execution.job_id, "FAILED",
                             {"stage": "smoke", "reason": reason})
    ex = bridge.execution()
    assert ex.status == "FAILED"
    assert ex.status_details_map["stage"] == "smoke"
    assert "INVALID_ARGUMENT" in ex.status_details_map["reason"]
    updates = [r for t, r in link.requests if t.endswith("/update")]
    assert len(updates) == 2 and updates[0]["statusDetails"]["reason"] == reason


def test_when_aws_refuses_any_details_the_status_is_sent_without_them(tmp_path, bridge) -> None:
    link = BridgeLink(bridge.engine, refuse=lambda topic, request: "no details today"
                      if "statusDetails" in request else None)
    client, execution = _started(bridge, link)
    agent = _agent(tmp_path)
    agent._finish(client, execution.job_id, "FAILED",
                  status_details(stage="smoke", reason="model é \U0001f600"))
    assert bridge.execution().status == "FAILED"
    sent = [r.get("statusDetails") for t, r in link.requests if t.endswith("/update")]
    assert sent == [{"stage": "smoke", "reason": "model é \U0001f600"},
                    {"stage": "smoke", "reason": "model \\u00e9 \\U0001f600"}, None]
    assert agent.stats()["last_job"]["status"] == "FAILED"


def test_progress_details_reach_the_bridge_unchanged_when_valid(bridge) -> None:
    link = BridgeLink(bridge.engine)
    client, execution = _started(bridge, link)
    details = status_details(stage="downloading", version=3, codec="delta:bsdiff4:v2")
    assert client.update(execution.job_id, "IN_PROGRESS", details).accepted
    assert bridge.execution().status_details_map == details
    assert len([1 for t, _ in link.requests if t.endswith("/update")]) == 1


# --------------------------------------------------- replies and config from outside


@given(execution=st.one_of(json_values(), st.fixed_dictionaries({}, optional={
    "jobId": st.one_of(st.just("job-1"), nasty_text(), json_values(1)),
    "status": json_values(1), "jobDocument": json_values(3), "versionNumber": nasty_numbers(),
    "executionNumber": nasty_numbers(), "statusDetails": json_values(3)})))
def test_an_execution_in_a_reply_parses_or_is_a_reply_error(execution: Any) -> None:
    try:
        job = JobExecution.from_reply(execution)
    except JobReplyError:
        return
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", job.job_id)
    assert isinstance(job.document, dict) and isinstance(job.status, str)
    assert job.version_number is None or (type(job.version_number) is int
                                          and job.version_number >= 0)


@given(payload=st.one_of(st.binary(max_size=64), json_values().map(
    lambda v: json.dumps(v).encode("utf-8", "surrogatepass")), st.just(b"[" * 50_000)))
def test_any_reply_payload_is_handled_without_raising(payload: bytes) -> None:
    client = JobsClient(BridgeLink(None), THING, lambda *_: None)  # type: ignore[arg-type]
    client._on_reply(f"$aws/things/{THING}/jobs/start-next/accepted", payload)


_config_values = st.dictionaries(
    st.sampled_from(["thing", "model", "port", "rate", "fault_rate", "seed", "duration",
                     "insecure_no_tls", "cert", "key", "log_level", "session_threads",
                     "request_timeout", "state_dir", "sensor", "unknown-field"]),
    st.one_of(json_values(2), nasty_numbers(), nasty_text()))


@given(values=st.one_of(json_values(), _config_values.map(
    lambda v: {"thing": "dev-1", "model": "vibration-anomaly", **v})))
def test_agent_config_is_valid_or_a_config_error(values: Any) -> None:
    try:
        config = AgentConfig.from_mapping(values).validate()
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(config.port, int) and 0 < config.port < 65536
    assert re.fullmatch(r"[a-zA-Z0-9:_-]{1,128}", config.thing)


@pytest.mark.parametrize("text", ["[" * 100_000, "{", "\udcff", '{"thing": "d\\n"}', "9" * 5000,
                                  '{"thing": "dev-1", "model": "m", "rate": ' + "9" * 400 + "}",
                                  '{"thing": "dev-1", "model": "m", "port": 1e999}'])
def test_a_bad_config_file_is_a_config_error(tmp_path, text: str) -> None:
    path = tmp_path / "agent.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError):
        AgentConfig.from_file(path).validate()
