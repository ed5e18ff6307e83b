"""Lambda's event-source mappings for the local stack: SQS queues -> Chalice handlers.

One poller thread per route long-polls its queue and invokes the handler with
the event AWS would deliver:
- `sqs`: Lambda's SQS event (`{"Records": [{"messageId", "receiptHandle", "body",
  "attributes", "messageAttributes", "md5OfBody", "eventSource": "aws:sqs",
  "eventSourceARN", "awsRegion"}]}`), up to the decorator's batch size;
- `eventbridge`: the SQS body is the EventBridge event; the handler gets it as-is;
- `s3`: the SQS body is the S3 notification (`{"Records": [...]}`); S3's
  `s3:TestEvent` is skipped, as Lambda's own S3 trigger never delivers it.

A message is deleted only after its handler returned. A failing handler's
messages become visible again after `retry_delay` seconds; after
`max_attempts` receives they are written to the dead-letter folder (one JSON
file per message, with the error and traceback) and deleted from the queue:
nothing is lost and nothing loops forever. Invocations run one at a time:
`chalice.test.Client` swaps the process environment while a handler runs.

`python -m mledge_devstack.dispatcher --project-dir . --stage dev ...` runs it
for the project's `app.py` (the stack starts it that way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mledge_devstack.routes import EVENTBRIDGE, S3, SQS, Route

log = logging.getLogger("mledge_devstack.dispatcher")

Invoke = Callable[[str, dict[str, Any]], Any]


@dataclass
class DispatchStats:
    invocations: int = 0
    failures: int = 0
    dead_lettered: int = 0


class DispatcherError(Exception):
    """The dispatcher cannot start (a queue is missing, the app cannot be loaded)."""


def lambda_sqs_record(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """An SQS message from ReceiveMessage in the shape Lambda hands to a function."""
    attributes = {k: v for k, v in message.get("Attributes", {}).items()
                  if k in ("ApproximateReceiveCount", "SentTimestamp", "SenderId",
                           "ApproximateFirstReceiveTimestamp", "MessageGroupId",
                           "MessageDeduplicationId", "SequenceNumber", "AWSTraceHeader")}
    message_attributes = {}
    for name, value in message.get("MessageAttributes", {}).items():
        message_attributes[name] = {
            "stringValue": value.get("StringValue"),
            "binaryValue": value.get("BinaryValue"),
            "stringListValues": value.get("StringListValues", []),
            "binaryListValues": value.get("BinaryListValues", []),
            "dataType": value.get("DataType"),
        }
    body = message["Body"]
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": body,
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": message.get("MD5OfBody") or hashlib.md5(body.encode()).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def complete_eventbridge_event(event: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """Fill the fields EventBridge always sends and moto 5.2's SQS target leaves out (`account`)."""
    arn_parts = queue_arn.split(":")
    event.setdefault("version", "0")
    event.setdefault("account", arn_parts[4] if len(arn_parts) > 4 else "123456789012")
    event.setdefault("region", arn_parts[3] if len(arn_parts) > 3 else "us-east-1")
    event.setdefault("resources", [])
    return event


def _is_s3_test_event(body: Any) -> bool:
    return isinstance(body, dict) and body.get("Event") == "s3:TestEvent"


class Dispatcher:
    """Polls each route's queue and invokes its handler; see the module docstring."""

    def __init__(self, sqs: Any, invoke: Invoke, routes: list[Route], *, dead_letter_dir: Path,
                 region: str = "us-east-1", max_attempts: int = 3, retry_delay: int = 1,
                 wait_seconds: int = 1, visibility_timeout: int = 900) -> None:
        self.sqs = sqs
        self.invoke = invoke
        self.routes = routes
        self.dead_letter_dir = Path(dead_letter_dir)
        self.region = region
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.wait_seconds = wait_seconds
        self.visibility_timeout = visibility_timeout  # Lambda's max runtime: a handler finishes first
        self.stats = DispatchStats()
        self._invoke_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queues: dict[str, tuple[str, str]] = {}

    def _queue(self, name: str) -> tuple[str, str]:
        if name not in self._queues:
            try:
                url = self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
            except Exception as exc:
                raise DispatcherError(f"queue {name} does not exist: {exc}") from exc
            arn = self.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            self._queues[name] = (url, arn)
        return self._queues[name]

    def start(self) -> Dispatcher:
        for route in self.routes:
            self._queue(route.queue)  # fail now, not in a thread, when a queue is missing
            thread = threading.Thread(target=self._poll_forever, args=(route,),
                                      name=f"poll-{route.handler}", daemon=True)
            thread.start()
            self._threads.append(thread)
            log.info("polling %s -> %s (%s events)", route.queue, route.handler, route.kind)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _poll_forever(self, route: Route) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once(route)
            except Exception:  # the endpoint restarting must not end the poller
                log.exception("polling %s failed; retrying", route.queue)
                self._stop.wait(1.0)

    def poll_once(self, route: Route, wait_seconds: int | None = None) -> int:
        """Receive one batch from the route's queue and deliver it; returns messages received."""
        url, arn = self._queue(route.queue)
        response = self.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=max(1, min(route.batch_size, 10)),
            WaitTimeSeconds=self.wait_seconds if wait_seconds is None else wait_seconds,
            VisibilityTimeout=self.visibility_timeout,
            AttributeNames=["All"], MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if not messages:
            return 0
        if route.kind == SQS:
            event = {"Records": [lambda_sqs_record(m, arn, self.region) for m in messages]}
            self._deliver(route, url, messages, event)
        else:
            for message in messages:  # EventBridge and S3 targets invoke once per event
                body = json.loads(message["Body"])
                if route.kind == S3 and _is_s3_test_event(body):
                    self._delete(url, [message])
                    continue
                if route.kind == EVENTBRIDGE:
                    body = complete_eventbridge_event(body, arn)
                self._deliver(route, url, [message], body)
        return len(messages)

    def _deliver(self, route: Route, url: str, messages: list[dict[str, Any]],
                 event: dict[str, Any]) -> None:
        try:
            with self._invoke_lock:
                self.stats.invocations += 1
                self.invoke(route.handler, event)
        except Exception as exc:
            self.stats.failures += 1
            log.warning("handler %s failed on %d message(s) from %s: %s",
                        route.handler, len(messages), route.queue, exc)
            self._after_failure(route, url, messages, exc)
            return
        self._delete(url, messages)

    def _after_failure(self, route: Route, url: str, messages: list[dict[str, Any]],
                       exc: Exception) -> None:
        for message in messages:
            attempts = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            if attempts >= self.max_attempts:
                self._dead_letter(route, message, exc, attempts)
                self._delete(url, [message])
            else:
                self.sqs.change_message_visibility(
                    QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=self.retry_delay)

    def _dead_letter(self, route: Route, message: dict[str, Any], exc: Exception,
                     attempts: int) -> Path:
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True)
        path = self.dead_letter_dir / f"{route.queue}-{message['MessageId']}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps({
            "queue": route.queue,
            "handler": route.handler,
            "attempts": attempts,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)),
            "dead_lettered_at": time.time(),
            "message": {k: v for k, v in message.items() if k != "ReceiptHandle"},
        }, indent=2, default=str))
        self.stats.dead_lettered += 1
        log.error("dead-lettered message %s from %s after %d attempts: %s",
                  message["MessageId"], route.queue, attempts, path)
        return path

    def _delete(self, url: str, messages: list[dict[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                   for i, m in enumerate(messages)]
        if entries:
            self.sqs.delete_message_batch(QueueUrl=url, Entries=entries)


def chalice_invoker(app: Any, *, project_dir: Path, stage: str) -> Invoke:
    """Invokes handlers through `chalice.test.Client` (the stage's env vars, a Lambda context)."""
    from chalice.test import Client

    client = Client(app, stage_name=stage, project_dir=str(project_dir))

    def invoke(handler: str, event: dict[str, Any]) -> Any:
        return client.lambda_.invoke(handler, event).payload

    return invoke


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deliver queued events to app.py's handlers.")
    parser.add_argument("--project-dir", required=True, help="folder with app.py and .chalice/")
    parser.add_argument("--stage", default="dev")
    parser.add_argument("--dead-letter-dir", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--queue-prefix", default="mledge-local")
    parser.add_argument("--watch-queue", action="append", default=[],
                        help="a queue the stack made; logged when no handler consumes it")
    parser.add_argument("--route", action="append", default=[], metavar="QUEUE=HANDLER",
                        help="an extra queue -> handler mapping (Lambda SQS events)")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import boto3

    from chalicelib.aws import AwsClients
    from chalicelib.settings import Settings
    from mledge_devstack.local_training import register_local_backend
    from mledge_devstack.routes import provision_routes, routes_from_app, unrouted_queues

    register_local_backend()  # models with `training.backend = "local"` train in this process
    settings = Settings.from_env()
    clients = AwsClients.for_settings(settings)
    sys.path.insert(0, str(Path(args.project_dir).resolve()))
    import app as app_module  # the environment is set: module-level reads see the stack

    extra = dict(item.split("=", 1) for item in args.route)
    routes = routes_from_app(app_module.app, queue_prefix=args.queue_prefix, extra_routes=extra)
    provision_routes(routes, sqs=clients.sqs, events=clients.events, s3=clients.s3,
                     region=settings.region)
    for queue in unrouted_queues(routes, args.watch_queue):
        log.warning("queue %s: no handler in app.py consumes it yet; left unpolled", queue)
    # Pollers get their own client: long polls must not hold the handlers' connections.
    sqs = boto3.client("sqs", region_name=settings.region, endpoint_url=settings.endpoint_url)
    dispatcher = Dispatcher(
        sqs, chalice_invoker(app_module.app, project_dir=Path(args.project_dir), stage=args.stage),
        routes, dead_letter_dir=Path(args.dead_letter_dir), region=settings.region,
        max_attempts=args.max_attempts,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Written whole, then renamed: the stack reads the file as soon as it exists.
    ready = Path(args.ready_file)
    ready.with_suffix(".tmp").write_text(json.dumps({
        "routes": [{"queue": r.queue, "handler": r.handler, "kind": r.kind} for r in routes],
    }))
    ready.with_suffix(".tmp").replace(ready)
    stop.wait()
    dispatcher.stop()


if __name__ == "__main__":
    main()
