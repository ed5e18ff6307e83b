"""Helpers for the trigger and backend tests: raw objects, S3/SQS event shapes, a small config."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

from chalicelib import layout
from chalicelib.config import PipelineConfig, parse_pipeline_config

TEST_PIPELINE = """
[models.vib]
family = "kmeans_anomaly"
metric = "silhouette"
threshold = 0.3
min_new_records = 100
thing_group = "g-vib"
[models.vib.schema]
features = ["a", "b"]
[models.vib.training]
backend = "sagemaker"
instance_type = "ml.m5.xlarge"
volume_size_gb = 40
max_runtime_seconds = 1800
schedule = "rate(1 day)"
[models.vib.hyperparameters]
k_min = 2
k_max = 4
seed = 7

[models.dig]
family = "cnn"
metric = "accuracy"
threshold = 0.9
min_new_records = 50
thing_group = "g-dig"
[models.dig.schema]
features = { count = 4, prefix = "px" }
label = "required"
[models.dig.training]
backend = "batch"
instance_type = "g4dn.xlarge"
gpu_count = 1
max_runtime_seconds = 900
[models.dig.hyperparameters]
image_shape = "2,2"
epochs = 50

[models.loc]
family = "kmeans_anomaly"
metric = "silhouette"
threshold = 0.0
min_new_records = 10
thing_group = "g-loc"
[models.loc.schema]
features = ["a", "b"]
[models.loc.training]
backend = "local"
max_runtime_seconds = 120
[models.loc.hyperparameters]
k_min = 2
k_max = 3
seed = 1
"""


def small_pipeline_config() -> PipelineConfig:
    import tomllib

    return parse_pipeline_config(tomllib.loads(TEST_PIPELINE), file="test-pipeline.toml")


def readings(model: str, n: int, start: int = 0, n_features: int = 2) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        centre = 10.0 * (i % 3)
        features = [centre + ((i * 7919 + j * 104729) % 100) / 100.0 for j in range(n_features)]
        out.append({"id": f"t-{i}", "thing": f"t{i % 5}", "model": model, "ts": 1.7e9 + i,
                    "received_at": 1_700_000_000_000 + i, "features": features})
    return out


def put_raw(s3: Any, bucket: str, model: str, batch_id: str, records: list[dict[str, Any]],
            *, with_metadata: bool = True, hour: int = 10) -> str:
    """A raw object as ingest writes it (gzip JSON lines, `record-count` metadata)."""
    key = layout.raw_key(model, datetime(2024, 5, 1, hour, tzinfo=UTC), batch_id)
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), mtime=0)
    extra: dict[str, Any] = {"Metadata": {"record-count": str(len(records))}} \
        if with_metadata else {}
    s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
    return key


def s3_record(bucket: str, key: str, *, event_name: str = "ObjectCreated:Put",
              sequencer: str = "0055AED6DCD90281E5", size: int = 100) -> dict[str, Any]:
    """One S3 notification record; the key URL-encoded the way S3 sends it."""
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-05-01T10:00:00.000Z", "eventName": event_name,
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "raw-objects",
               "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": quote_plus(key, safe="/"), "size": size,
                          "eTag": "d41d8cd98f00b204e9800998ecf8427e", "sequencer": sequencer}},
    }


def s3_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def sqs_event(*bodies: dict[str, Any] | str) -> dict[str, Any]:
    """An SQS event whose message bodies are S3 notifications (S3 -> SQS)."""
    return {"Records": [
        {"messageId": f"m-{i}", "receiptHandle": f"r-{i}", "eventSource": "aws:sqs",
         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:mledge-test-raw-events",
         "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {},
         "md5OfBody": "", "body": body if isinstance(body, str) else json.dumps(body)}
        for i, body in enumerate(bodies)
    ]}


S3_TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-05-01T10:00:00Z",
                 "Bucket": "mledge-test-data", "RequestId": "X", "HostId": "Y"}


class RecordingBackend:
    """A backend that records requests (and can be told to fail)."""

    def __init__(self, name: str = "sagemaker", fail: Exception | None = None) -> None:
        self.name = name
        self.fail = fail
        self.requests: list[Any] = []

    def start(self, request: Any) -> str:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return request.job_name


class RecordingClient:
    """Wraps a boto3 client and records the keyword arguments of every call."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return attr(*args, **kwargs)

        return call
