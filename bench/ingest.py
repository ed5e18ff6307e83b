"""Telemetry ingest throughput: records/s through the handler and S3 PUTs per 1,000 records.

Runs everything in-process against moto's S3. Prints, for one batch of --records
messages (repeated --repeat times with fresh message ids, best and median):

- baseline: json.loads of every body + json.dumps of every record + one gzip (the
  unavoidable parse/serialise/compress cost, no validation, no S3)
- ingest_messages: the chalicelib function (validation, normalisation, gzip, PUT)
- chalice client: the same through `chalice.test.Client(app).lambda_.invoke` with a
  Lambda SQS event in AWS's shape (adds event parsing and the Chalice wrapper)
- replay: the same batch again (conditional PUT refused, nothing written)

Usage: python bench/ingest.py [--records 10000] [--model vibration-anomaly|digits]
                              [--bad-percent 0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
    "MLEDGE_STAGE": "bench", "MLEDGE_BUCKET": "mledge-bench-data",
    "MLEDGE_REGISTRY_TABLE": "mledge-bench-registry", "MLEDGE_STATE_TABLE": "mledge-bench-state",
    "MLEDGE_TELEMETRY_QUEUE": "mledge-bench-telemetry",
    "POWERTOOLS_METRICS_NAMESPACE": "MLEdgeDeployBench", "POWERTOOLS_SERVICE_NAME": "mledgedeploy",
    # one INFO line per batch is negligible, but it would interleave with the report
    "POWERTOOLS_LOG_LEVEL": "WARNING",
}
for _name, _value in BENCH_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.pop("AWS_ENDPOINT_URL", None)

from chalice.test import Client  # noqa: E402
from moto import mock_aws  # noqa: E402

from chalicelib.aws import AwsClients  # noqa: E402
from chalicelib.ingest import ingest_messages, messages_from_event  # noqa: E402
from chalicelib.runtime import Runtime, set_runtime  # noqa: E402
from chalicelib.settings import Settings  # noqa: E402

RECEIVED_AT_MS = 1_767_268_800_000


def make_bodies(model: str, n: int, feature_count: int, bad_percent: float) -> list[str]:
    bodies = []
    bad_every = int(100 / bad_percent) if bad_percent > 0 else 0
    for i in range(n):
        if model == "digits":
            features: list[float] = [float((i * 7 + j) % 17) for j in range(feature_count)]
        else:
            features = [round(0.5 + (i % 97) * 0.013 + j * 1.1, 6) for j in range(feature_count)]
        record: dict[str, Any] = {
            "id": f"thing-{i % 50:03d}-{i}", "ts": 1_767_268_700.0 + i * 0.01,
            "features": features, "model": model, "thing": f"thing-{i % 50:03d}",
            "type": "telemetry", "received_at": RECEIVED_AT_MS + i,
        }
        if model == "digits":
            record["label"] = i % 10
        if bad_every and i % bad_every == 0:
            record["features"] = features[:-1]  # wrong count: goes to quarantine
        bodies.append(json.dumps(record))
    return bodies


def event_for(bodies: list[str], run: int) -> dict[str, Any]:
    return {"Records": [{
        "messageId": f"run{run}-{i:06d}", "receiptHandle": f"h{i}", "body": body,
        "attributes": {"SentTimestamp": str(RECEIVED_AT_MS + i), "ApproximateReceiveCount": "1"},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:mledge-bench-telemetry",
        "awsRegion": "us-east-1",
    } for i, body in enumerate(bodies)]}


def baseline(bodies: list[str]) -> None:
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    lines = [dumps(json.loads(b)) for b in bodies]
    gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)


def timed(repeat: int, run: Callable[[int], None]) -> list[float]:
    seconds = []
    for i in range(repeat):
        # powertools logs and EMF metrics go to stdout; keep them out of the report
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            run(i)
            seconds.append(time.perf_counter() - start)
    return seconds


def report(name: str, n: int, seconds: list[float], extra: str = "") -> None:
    best, median = min(seconds), statistics.median(seconds)
    print(f"{name:<22} {n / best:>12,.0f} rec/s best  {n / median:>12,.0f} rec/s median  "
          f"({best * 1000:,.1f} ms best){extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--model", default="vibration-anomaly",
                        choices=["vibration-anomaly", "digits"])
    parser.add_argument("--bad-percent", type=float, default=0.0,
                        help="percent of records with a wrong feature count (quarantined)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    settings = Settings.from_env()
    with mock_aws():
        clients = AwsClients.for_settings(settings)
        clients.s3.create_bucket(Bucket=settings.bucket)
        runtime = Runtime.from_settings(settings, clients)
        set_runtime(runtime)
        schema = runtime.config.model(args.model).schema
        bodies = make_bodies(args.model, args.records, schema.feature_count, args.bad_percent)
        puts = {"n": 0}
        clients.s3.meta.events.register("before-call.s3.PutObject",
                                        lambda **_: puts.__setitem__("n", puts["n"] + 1))
        avg_bytes = sum(len(b) for b in bodies) / len(bodies)
        print(f"command: python bench/ingest.py --records {args.records} --model {args.model} "
              f"--bad-percent {args.bad_percent:g} --repeat {args.repeat}")
        print(f"python {platform.python_version()} on {platform.machine()}, "
              f"{os.cpu_count()} cpus; moto in-process S3; "
              f"{schema.feature_count} features, {avg_bytes:.0f} bytes/message")

        report("baseline parse+gzip", args.records, timed(args.repeat, lambda _: baseline(bodies)))

        events = [event_for(bodies, run) for run in range(args.repeat * 2)]
        results = []

        def direct(run: int) -> None:
            msgs = messages_from_event(events[run])
            results.append(ingest_messages(msgs, s3=clients.s3, bucket=settings.bucket,
                                           config=runtime.config))

        puts["n"] = 0
        seconds = timed(args.repeat, direct)
        per_batch = puts["n"] / args.repeat
        last = results[-1]
        report("ingest_messages", args.records, seconds,
               f"  PUTs/batch {per_batch:g}, PUTs/1,000 records {per_batch * 1000 / args.records:.2f}, "
               f"accepted {sum(last.accepted.values())}, quarantined {sum(last.quarantined.values())}")

        from app import app

        with Client(app, stage_name="dev") as client:
            puts["n"] = 0
            seconds = timed(args.repeat, lambda run: client.lambda_.invoke(
                "ingest_telemetry", events[args.repeat + run]))
            per_batch = puts["n"] / args.repeat
            report("chalice test client", args.records, seconds,
                   f"  PUTs/batch {per_batch:g}")

            puts["n"] = 0
            seconds = timed(args.repeat, lambda _: client.lambda_.invoke(
                "ingest_telemetry", events[args.repeat]))
            report("replay (same batch)", args.records, seconds,
                   f"  PUT attempts/batch {puts['n'] / args.repeat:g} (all refused: key exists)")
        size = sum(o.size for o in last.objects if o.kind == "raw")
        print(f"raw object: {size:,} bytes gzip for {args.records:,} records "
              f"({size / max(1, args.records):.1f} bytes/record)")
        set_runtime(None)


if __name__ == "__main__":
    main()
