"""The dispatcher with a tiny Chalice app of its own, against a real moto server (in-process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from chalice import Chalice
from mledge_devstack.dispatcher import Dispatcher, chalice_invoker
from mledge_devstack.procs import free_port
from mledge_devstack.routes import EVENTBRIDGE, SQS, provision_routes, routes_from_app

REGION = "us-east-1"


pytestmark = pytest.mark.stack  # a moto server over HTTP


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def client(service: str, endpoint: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class Recorder:
    """A test app whose handlers record their events; `broken` always raises."""

    def __init__(self, suffix: str) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {"ok": [], "broken": [], "done": []}
        self.app = app = Chalice(app_name=f"dispatch-test-{suffix}")
        self.ok_queue, self.broken_queue = f"ok-{suffix}", f"broken-{suffix}"

        @app.on_sqs_message(queue=self.ok_queue, batch_size=5)
        def ok(event: Any) -> None:
            self.events["ok"].append(event.to_dict())

        @app.on_sqs_message(queue=self.broken_queue)
        def broken(event: Any) -> None:
            self.events["broken"].append(event.to_dict())
            raise RuntimeError("handler bug")

        @app.on_cw_event({"source": ["aws.sagemaker"],
                          "detail-type": ["SageMaker Training Job State Change"]})
        def done(event: Any) -> None:
            self.events["done"].append(event.to_dict())


def make_dispatcher(recorder: Recorder, endpoint: str, tmp_path: Path, **kwargs: Any) -> Dispatcher:
    routes = routes_from_app(recorder.app, queue_prefix=f"t-{recorder.app.app_name}")
    provision_routes(routes, sqs=client("sqs", endpoint), events=client("events", endpoint),
                     s3=client("s3", endpoint), region=REGION)
    return Dispatcher(client("sqs", endpoint),
                      chalice_invoker(recorder.app, project_dir=tmp_path, stage="dev"),
                      routes, dead_letter_dir=tmp_path / "dead", region=REGION, **kwargs)


def route(dispatcher: Dispatcher, handler: str):
    return next(r for r in dispatcher.routes if r.handler == handler)


def test_sqs_handler_gets_lambdas_event_shape_and_messages_are_deleted(endpoint, tmp_path):
    recorder = Recorder("shape")
    dispatcher = make_dispatcher(recorder, endpoint, tmp_path)
    sqs = client("sqs", endpoint)
    url = sqs.get_queue_url(QueueName=recorder.ok_queue)["QueueUrl"]
    sent = [sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": i}))["MessageId"]
            for i in range(3)]

    received = 0
    while received < 3:
        got = dispatcher.poll_once(route(dispatcher, "ok"), wait_seconds=1)
        assert got, "messages sent to the queue were not received"
        received += got
    records = [r for event in recorder.events["ok"] for r in event["Records"]]
    assert sorted(r["messageId"] for r in records) == sorted(sent)
    first = records[0]
    assert first["eventSource"] == "aws:sqs"
    assert first["eventSourceARN"] == f"arn:aws:sqs:{REGION}:123456789012:{recorder.ok_queue}"
    assert first["awsRegion"] == REGION and first["attributes"]["ApproximateReceiveCount"] == "1"
    assert {json.loads(r["body"])["n"] for r in records} == {0, 1, 2}
    assert dispatcher.poll_once(route(dispatcher, "ok"), wait_seconds=0) == 0  # all deleted


def test_failing_handler_is_retried_then_dead_lettered(endpoint, tmp_path):
    recorder = Recorder("fail")
    dispatcher = make_dispatcher(recorder, endpoint, tmp_path, max_attempts=2, retry_delay=0)
    sqs = client("sqs", endpoint)
    url = sqs.get_queue_url(QueueName=recorder.broken_queue)["QueueUrl"]
    message_id = sqs.send_message(QueueUrl=url, MessageBody='{"keep": "me"}')["MessageId"]

    assert dispatcher.poll_once(route(dispatcher, "broken"), wait_seconds=1) == 1
    assert not (tmp_path / "dead").exists()  # first failure: back on the queue
    assert dispatcher.poll_once(route(dispatcher, "broken"), wait_seconds=1) == 1
    assert len(recorder.events["broken"]) == 2
    [dead] = [json.loads(p.read_text()) for p in (tmp_path / "dead").glob("*.json")]
    assert dead["message"]["MessageId"] == message_id and dead["message"]["Body"] == '{"keep": "me"}'
    assert dead["handler"] == "broken" and dead["attempts"] == 2
    assert "RuntimeError: handler bug" in dead["error"]
    assert dispatcher.poll_once(route(dispatcher, "broken"), wait_seconds=0) == 0
    assert dispatcher.stats.dead_lettered == 1


def test_local_training_event_reaches_the_training_state_handler(endpoint, tmp_path):
    recorder = Recorder("events")
    dispatcher = make_dispatcher(recorder, endpoint, tmp_path)
    done = route(dispatcher, "done")
    assert done.kind == EVENTBRIDGE and len(done.event_patterns) == 2
    detail = {"TrainingJobName": "mledge-digits-v3-abc", "TrainingJobStatus": "Completed"}
    client("events", endpoint).put_events(Entries=[{
        "Source": "mledge.local-training", "DetailType": "SageMaker Training Job State Change",
        "Detail": json.dumps(detail), "EventBusName": "default"}])
    client("events", endpoint).put_events(Entries=[{
        "Source": "mledge.local-training", "DetailType": "Something else",
        "Detail": "{}", "EventBusName": "default"}])

    assert dispatcher.poll_once(done, wait_seconds=2) == 1
    [event] = recorder.events["done"]
    assert event["source"] == "mledge.local-training" and event["account"] == "123456789012"
    assert event["detail-type"] == "SageMaker Training Job State Change"
    assert event["detail"] == detail
    assert dispatcher.poll_once(done, wait_seconds=0) == 0  # the other event matched no rule


def test_routes_tolerate_handlers_that_do_not_exist_yet():
    recorder = Recorder("missing")
    routes = routes_from_app(recorder.app, queue_prefix="x",
                             extra_routes={"telemetry": "ingest_telemetry", "other": "ok"})
    assert ("telemetry", "ingest_telemetry") not in {(r.queue, r.handler) for r in routes}
    assert ("other", "ok", SQS) in {(r.queue, r.handler, r.kind) for r in routes}
