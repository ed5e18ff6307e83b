"""Builders for telemetry messages and Lambda SQS events, shared by ingest tests and bench."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from typing import Any

RECEIVED_AT_MS = 1_767_268_800_000  # 2026-01-01T12:00:00Z
SENT_AT_MS = RECEIVED_AT_MS + 150
VIBRATION = "vibration-anomaly"
DIGITS = "digits"


def reading(model: str = VIBRATION, seq: int = 0, thing: str = "pump-001", **fields: Any
            ) -> dict[str, Any]:
    """One IoT-rule output for a telemetry reading (device JSON + the rule's fields)."""
    if model == DIGITS:
        features: list[float] = [float((seq + i) % 17) for i in range(64)]
        extra: dict[str, Any] = {"label": seq % 10}
    else:
        features = [0.5 + seq * 0.001 + i for i in range(8)]
        extra = {}
    record = {"id": f"{thing}-{seq}", "ts": 1_767_268_799.5 + seq, "features": features,
              **extra, "model": model, "thing": thing, "type": "telemetry",
              "received_at": RECEIVED_AT_MS}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


def without(*names: str) -> dict[str, Any]:
    """Use as `reading(**without("id"))` to leave fields out."""
    return dict.fromkeys(names, _DROP)


def sqs_event(messages: Iterable[tuple[str, str]], queue: str = "mledge-test-telemetry",
              sent_at_ms: int = SENT_AT_MS) -> dict[str, Any]:
    """A Lambda SQS event in AWS's shape, one record per (message id, body)."""
    records = []
    for message_id, body in messages:
        records.append({
            "messageId": message_id,
            "receiptHandle": f"handle-{message_id}",
            "body": body,
            "attributes": {
                "ApproximateReceiveCount": "1",
                "SentTimestamp": str(sent_at_ms),
                "SenderId": "AROAIOTRULE:iot",
                "ApproximateFirstReceiveTimestamp": str(sent_at_ms + 20),
            },
            "messageAttributes": {},
            "md5OfBody": hashlib.md5(body.encode("utf-8", "surrogatepass")).hexdigest(),
            "eventSource": "aws:sqs",
            "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue}",
            "awsRegion": "us-east-1",
        })
    return {"Records": records}


def read_lines(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return [json.loads(line) for line in gzip.decompress(body).decode("utf-8").splitlines()]


def all_objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket: key -> bytes."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out
