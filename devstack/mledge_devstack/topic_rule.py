"""The IoT topic rule that moto cannot run: MQTT telemetry -> the telemetry SQS queue.

AWS: `SELECT *, topic(3) AS model, topic(4) AS thing, topic(5) AS type,
timestamp() AS received_at FROM 'dt/mledge/+/+/+'` with an SQS action, one
message per MQTT message. Here: the same projection, batched into
`send_message_batch` calls (SQS's limit of 10 entries) by a worker thread.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from mledge_update.topics import TELEMETRY_FILTER, parse_telemetry_topic

log = logging.getLogger(__name__)

RULE_FILTER = TELEMETRY_FILTER
SQS_BATCH = 10


def apply_topic_rule(topic: str, payload: bytes, received_at_ms: int) -> dict[str, Any] | None:
    """The rule's output for one message, or None where AWS's rule would not fire."""
    parsed = parse_telemetry_topic(topic)
    if parsed is None:
        return None
    model, thing, kind = parsed
    try:
        record = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # SELECT * over a non-JSON payload yields no JSON message for SQS
    if not isinstance(record, dict):
        return None
    # Selected fields named after `*` win over payload fields of the same name.
    record.update(model=model, thing=thing, type=kind, received_at=received_at_ms)
    return record


class TelemetryForwarder:
    """Sends rule outputs to the telemetry queue in batches; keeps them until SQS takes them."""

    def __init__(self, sqs: Any, queue_name: str, *, retry_delay: float = 0.5) -> None:
        self.sqs = sqs
        self.queue_name = queue_name
        self.retry_delay = retry_delay
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._queue_url: str | None = None
        self._thread = threading.Thread(target=self._run, name="topic-rule", daemon=True)
        self.forwarded = 0
        self.dropped = 0

    def start(self) -> TelemetryForwarder:
        self._thread.start()
        return self

    def on_message(self, topic: str, payload: bytes) -> None:
        record = apply_topic_rule(topic, payload, int(time.time() * 1000))
        if record is None:
            self.dropped += 1
            log.warning("topic rule: dropped a message on %s (not a JSON object)", topic)
            return
        self._queue.put(record)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[dict[str, Any]] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                if len(batch) == SQS_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            while batch and not self._send(batch):
                if stopping:
                    log.error("topic rule: %d messages not delivered at shutdown", len(batch))
                    break
                time.sleep(self.retry_delay)

    def _send(self, batch: list[dict[str, Any]]) -> bool:
        """True when SQS took every message of the batch; failed ones stay in `batch`."""
        try:
            if self._queue_url is None:
                self._queue_url = self.sqs.get_queue_url(QueueName=self.queue_name)["QueueUrl"]
            entries = [{"Id": str(i), "MessageBody": json.dumps(r, separators=(",", ":"))}
                       for i, r in enumerate(batch)]
            response = self.sqs.send_message_batch(QueueUrl=self._queue_url, Entries=entries)
        except Exception as exc:  # queue not created yet, endpoint restarting: keep and retry
            log.warning("topic rule: cannot send to %s yet: %s", self.queue_name, exc)
            return False
        failed = {int(f["Id"]) for f in response.get("Failed", [])}
        self.forwarded += len(batch) - len(failed)
        batch[:] = [r for i, r in enumerate(batch) if i in failed]
        return not batch
