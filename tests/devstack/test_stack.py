"""The whole local stack with real processes: moto server + bridge, mosquitto (TLS, ACL), dispatcher.

One stack serves the module (starting one takes a few seconds); the last test
stops it and checks that no process of it survives.
"""

from __future__ import annotations

import json
import queue
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from mledge_devstack.mqtt import MqttClient
from mledge_devstack.procs import process_group_alive
from mledge_devstack.stack import LocalStack, StackInfo

from tests.conftest import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.stack]
MODEL = "vibration-anomaly"
WAIT = 15.0  # bound for every wait on the stack (never an assertion on speed)

# A stand-in app.py: the stack must serve any app; this one records what it is given.
TEST_APP = '''
import json, os, uuid
from chalice import Chalice

app = Chalice(app_name="devstack-test")
OUT = os.environ["DEVSTACK_TEST_OUT"]


@app.on_cw_event({"source": ["aws.sagemaker"], "detail-type": ["SageMaker Training Job State Change"]})
def training_state(event):
    with open(os.path.join(OUT, uuid.uuid4().hex + ".json"), "w") as f:
        json.dump({"event": event.to_dict(), "bucket": os.environ["MLEDGE_BUCKET"],
                   "endpoint": os.environ.get("AWS_ENDPOINT_URL")}, f)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    app_dir = tmp_path_factory.mktemp("app")
    (app_dir / "app.py").write_text(TEST_APP)
    shutil.copytree(REPO / ".chalice", app_dir / ".chalice")
    out = tmp_path_factory.mktemp("handler-out")
    local = LocalStack(tmp_path_factory.mktemp("devstack"), app_dir=app_dir,
                       extra_env={"DEVSTACK_TEST_OUT": str(out)})
    local.start()
    local.handler_out = out  # type: ignore[attr-defined]
    try:
        yield local
    finally:
        local.stop()


class Inbox:
    """Messages one MQTT client received, to wait on."""

    def __init__(self) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.put((topic, json.loads(payload)))

    def expect(self, match: Callable[[str, dict[str, Any]], bool],
               timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                topic, payload = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching message within {timeout}s; saw {self.seen}") from None
            self.seen.append((topic, payload))
            if match(topic, payload):
                return payload


def connected(stack: LocalStack, name: str) -> MqttClient:
    return stack.mqtt_client(name).connect()


def test_env_json_describes_the_running_stack(stack):
    info = StackInfo.load(stack.directory)
    assert info.endpoint_url == stack.env["AWS_ENDPOINT_URL"]
    assert info.env["MLEDGE_BUCKET"] == "mledge-dev-data"  # the stage's names, from .chalice
    assert set(info.pids) == {"mosquitto", "cloud", "dispatcher"}
    assert {"queue": "mledge-local-events-training-state", "handler": "training_state",
            "kind": "eventbridge"} in info.routes
    assert Path(info.ca_path).exists()


def test_device_cannot_read_another_devices_jobs(stack):
    stack.provision_thing("acl-a", MODEL)
    stack.provision_thing("acl-b", MODEL)
    spy = Inbox()
    with connected(stack, "acl-a") as a, connected(stack, "acl-b") as b:
        a_inbox = Inbox()
        a.subscribe("$aws/things/acl-a/jobs/notify-next", a_inbox)
        b.subscribe("$aws/things/acl-a/jobs/notify-next", spy)  # the broker must not deliver
        b.subscribe("$aws/things/acl-a/jobs/#", spy)
        b_inbox = Inbox()
        b.subscribe("$aws/things/acl-b/jobs/get/accepted", b_inbox)
        a.publish("$aws/things/acl-a/jobs/notify-next", {"secret": "for acl-a only"})
        a_inbox.expect(lambda t, p: p.get("secret") == "for acl-a only")
        # A round trip on acl-b's own connection: anything the broker had for acl-b
        # before it (acl-a's message included) has arrived by the time the reply does.
        b.publish("$aws/things/acl-b/jobs/get", {"clientToken": "marker"})
        b_inbox.expect(lambda t, p: p.get("clientToken") == "marker")
    assert spy.messages.empty()


def test_device_cannot_publish_telemetry_as_another_thing(stack):
    stack.provision_thing("tel-a", MODEL)
    sqs = stack.clients.sqs
    url = sqs.get_queue_url(QueueName=stack.settings.telemetry_queue)["QueueUrl"]
    with connected(stack, "tel-a") as a:
        a.publish(f"dt/mledge/{MODEL}/tel-b/telemetry", {"id": "spoofed", "features": [1.0]})
        a.publish(f"dt/mledge/{MODEL}/tel-a/telemetry",
                  {"id": "tel-a-1", "ts": 1.5, "features": [1.0, 2.0]})
    bodies = []
    deadline = time.monotonic() + WAIT
    while not any(b["id"] == "tel-a-1" for b in bodies):
        assert time.monotonic() < deadline, f"telemetry never reached SQS; got {bodies}"
        for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                     WaitTimeSeconds=1).get("Messages", []):
            bodies.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    [record] = [b for b in bodies if b["id"] == "tel-a-1"]
    assert {k: record[k] for k in ("model", "thing", "type", "ts", "features")} == {
        "model": MODEL, "thing": "tel-a", "type": "telemetry", "ts": 1.5, "features": [1.0, 2.0]}
    assert isinstance(record["received_at"], int) and record["received_at"] > 1_600_000_000_000
    assert [b["id"] for b in bodies] == ["tel-a-1"]  # the spoofed message was dropped


def test_group_job_reaches_device_with_presigned_url_and_update_flow(stack):
    group = stack.settings  # resolved below through the pipeline config's thing group
    online = stack.provision_thing("job-a", "digits")
    stack.provision_thing("job-b", "digits")  # stays offline: its execution stays QUEUED
    s3, iot = stack.clients.s3, stack.clients.iot
    key = "releases/digits/v00001/model.onnx.zst"
    s3.put_object(Bucket=group.bucket, Key=key, Body=b"model bytes")
    group_arn = iot.describe_thing_group(thingGroupName="mledge-digits")["thingGroupArn"]
    placeholder = (f"${{aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws.com/"
                   f"{group.bucket}/{key}}}")
    document = {"operation": "mledge.model-update", "version": 1, "full": {"url": placeholder}}

    with MqttClient(stack.credentials(online.name), port=online.port).connect() as device:
        inbox = Inbox()
        for suffix in ("notify-next", "start-next/accepted", "job-digits-1/update/accepted",
                       "job-digits-1/update/rejected"):
            device.subscribe(f"$aws/things/job-a/jobs/{suffix}", inbox)
        iot.create_job(jobId="job-digits-1", targets=[group_arn], document=json.dumps(document),
                       presignedUrlConfig={"roleArn": "arn:aws:iam::123456789012:role/p",
                                           "expiresInSec": 600},
                       targetSelection="SNAPSHOT")
        notified = inbox.expect(lambda t, p: t.endswith("notify-next") and "execution" in p)
        url = notified["execution"]["jobDocument"]["full"]["url"]
        assert url.startswith(stack.env["AWS_ENDPOINT_URL"])
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            assert response.read() == b"model bytes"

        device.publish("$aws/things/job-a/jobs/start-next",
                       {"clientToken": "s1", "statusDetails": {"step": "downloading"}})
        started = inbox.expect(lambda t, p: p.get("clientToken") == "s1")["execution"]
        assert (started["jobId"], started["status"], started["versionNumber"]) == (
            "job-digits-1", "IN_PROGRESS", 2)
        update = "$aws/things/job-a/jobs/job-digits-1/update"
        device.publish(update, {"status": "SUCCEEDED", "expectedVersion": 1, "clientToken": "u1"})
        rejected = inbox.expect(lambda t, p: p.get("clientToken") == "u1")
        assert rejected["code"] == "VersionMismatch" and rejected["executionState"]["versionNumber"] == 2
        device.publish(update, {"status": "SUCCEEDED", "expectedVersion": 2, "clientToken": "u2",
                                "statusDetails": {"installed_version": "1"}})
        inbox.expect(lambda t, p: t.endswith("/update/accepted") and p.get("clientToken") == "u2")
        inbox.expect(lambda t, p: t.endswith("notify-next") and "execution" not in p)

    # The IoT API reports what the devices did.
    assert stack.job_execution_states("job-digits-1") == {"job-a": "SUCCEEDED", "job-b": "QUEUED"}
    execution = iot.describe_job_execution(jobId="job-digits-1", thingName="job-a")["execution"]
    assert execution["statusDetails"]["detailsMap"] == {"installed_version": "1"}
    iot.cancel_job(jobId="job-digits-1")
    result = stack.wait_for_job("job-digits-1", timeout=WAIT)
    assert result["executions"] == {"job-a": "SUCCEEDED", "job-b": "CANCELED"}
    assert result["status"] == "CANCELED"
    assert result["counts"]["numberOfSucceededThings"] == 1


def test_dispatcher_routes_local_training_events_to_the_handler(stack):
    detail = {"TrainingJobName": "mledge-digits-v2-x", "TrainingJobStatus": "Completed"}
    stack.clients.events.put_events(Entries=[{
        "Source": "mledge.local-training", "DetailType": "SageMaker Training Job State Change",
        "Detail": json.dumps(detail)}])
    out: Path = stack.handler_out  # type: ignore[attr-defined]
    deadline = time.monotonic() + WAIT
    while not list(out.glob("*.json")):
        assert time.monotonic() < deadline, (stack.dispatcher.log_tail() if stack.dispatcher else "")
        time.sleep(0.1)
    [written] = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert written["event"]["detail"] == detail
    assert written["event"]["source"] == "mledge.local-training"
    assert written["bucket"] == "mledge-dev-data"
    assert written["endpoint"] == stack.env["AWS_ENDPOINT_URL"]


def test_provision_and_env_commands_give_a_device_and_a_shell_the_stack(stack, tmp_path):
    from mledge_edge.config import AgentConfig
    from mledge_update.signing import ReleaseVerifier

    env = {k: v for k, v in subprocess_env().items()
           if not k.startswith(("MLEDGE_", "AWS_", "POWERTOOLS_"))}
    done = subprocess.run(
        [sys.executable, "-m", "mledge_devstack", "provision", "cli-dev-1", "--model", MODEL,
         "--dir", str(stack.directory), "--out", str(tmp_path / "dev")],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"mledge-agent --config {tmp_path / 'dev' / 'agent.json'}" in done.stdout
    config = AgentConfig.from_file(tmp_path / "dev" / "agent.json").validate()
    assert (config.thing, config.port, config.insecure_no_tls) == ("cli-dev-1", stack.mqtt_port,
                                                                    False)
    ReleaseVerifier.from_pem(Path(config.release_keys).read_bytes())  # the stage's key
    group = stack.clients.iot.list_things_in_thing_group(thingGroupName="mledge-vibration")
    assert "cli-dev-1" in group["things"]

    # A shell with nothing set: eval the stack's environment, then the operator CLI works.
    script = (f'eval "$({shlex.quote(sys.executable)} -m mledge_devstack env '
              f'--dir {shlex.quote(str(stack.directory))})" && '
              f'{shlex.quote(sys.executable)} -m mledge_ops models --json')
    shell = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert {m["model"] for m in json.loads(shell.stdout)} >= {MODEL, "digits"}
    unknown = subprocess.run(
        [sys.executable, "-m", "mledge_devstack", "provision", "cli-dev-2", "--model", "nope",
         "--dir", str(stack.directory)], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "nope" in unknown.stderr
def test_a_certificate_cannot_take_another_things_client_id(stack):
    """AWS's policy allows only client/${ThingName}; here the broker makes the
    certificate's thing name the client id, so thing A claiming B's id cannot
    knock B offline (a second connection with the same id would)."""
    stack.provision_thing("id-a", MODEL)
    victim = stack.provision_thing("id-b", MODEL)
    with connected(stack, "id-b") as b:
        inbox = Inbox()
        b.subscribe("$aws/things/id-b/jobs/get/accepted", inbox)
        # id-a's certificate, id-b's client id
        impostor = MqttClient(stack.credentials("id-a"), port=victim.port, client_id="id-b")
        with impostor.connect():
            time.sleep(0.5)  # a takeover would have disconnected b by now
            b.publish("$aws/things/id-b/jobs/get", {"clientToken": "still-here"})
            inbox.expect(lambda t, p: p.get("clientToken") == "still-here")
            assert b.resumed == 0  # b's connection was never dropped


def test_bridge_resubscribes_after_the_broker_restarts(stack):
    stack.provision_thing("restart-a", MODEL)
    assert stack.broker is not None and stack.cloud is not None
    stack.broker.stop()
    stack.broker.start(timeout=WAIT)
    deadline = time.monotonic() + 3 * WAIT
    while "resubscribed" not in stack.cloud.log_tail(200):
        assert time.monotonic() < deadline, stack.cloud.log_tail()
        time.sleep(0.2)
    # The Jobs API answers again and telemetry reaches SQS again.
    with connected(stack, "restart-a") as device:
        inbox = Inbox()
        device.subscribe("$aws/things/restart-a/jobs/get/accepted", inbox)
        device.publish("$aws/things/restart-a/jobs/get", {"clientToken": "after-restart"})
        inbox.expect(lambda t, p: p.get("clientToken") == "after-restart")
        device.publish(f"dt/mledge/{MODEL}/restart-a/telemetry",
                       {"id": "restart-a-1", "features": [1.0]})
    sqs = stack.clients.sqs
    url = sqs.get_queue_url(QueueName=stack.settings.telemetry_queue)["QueueUrl"]
    seen: list[str] = []
    while "restart-a-1" not in seen:
        assert time.monotonic() < deadline, f"telemetry never reached SQS after the restart: {seen}"
        for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                     WaitTimeSeconds=1).get("Messages", []):
            seen.append(json.loads(m["Body"])["id"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def test_stop_leaves_no_process_behind(stack):
    groups = dict(stack.pids())
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) in groups.values()]
    assert len(members) >= 3
    stack.stop()
    for name, pgid in groups.items():
        assert not process_group_alive(pgid), f"{name}'s process group {pgid} survived stop()"
    assert not [p.pid for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
