"""The telemetry ingest handler end to end: Chalice's test client, moto S3, both example models."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from chalice.test import Client

from chalicelib.ingest import (
    EmfIngestMetrics,
    IngestError,
    SqsMessage,
    batch_id_for,
    ingest_messages,
)
from chalicelib.records import MAX_PAYLOAD_BYTES
from chalicelib.runtime import set_runtime
from tests.cloud.ingest_helpers import (
    DIGITS,
    RECEIVED_AT_MS,
    SENT_AT_MS,
    VIBRATION,
    all_objects,
    read_lines,
    reading,
    sqs_event,
    without,
)

HANDLER = "ingest_telemetry"


def _through_lambda_json(event: dict[str, Any]) -> dict[str, Any]:
    """What the Lambda runtime hands Python: the event serialised as JSON and parsed again.

    A body whose bytes were not UTF-8 travels as `\\udcXX` escapes and arrives as a str
    holding lone surrogates.
    """
    return json.loads(json.dumps(event))


# message id -> (body, expected reason substring); all land in quarantine
BAD_VIBRATION = {
    "bad-not-json": ("temperature=21.5", "body: not JSON"),
    "bad-array": ("[1, 2, 3]", "body: must be a JSON object, got an array"),
    "bad-not-utf8": (b'{"id": "caf\xe9", "model": "vibration-anomaly"}'.decode(
        "utf-8", "surrogateescape"), "not valid UTF-8"),
    "bad-replacement": (json.dumps(reading(seq=90, id="pump-\ufffd"), ensure_ascii=False),
                        "U+FFFD"),
    "bad-lone-surrogate-escape": ('{"id": "x\\ud800", "model": "vibration-anomaly"}',
                                  "lone surrogate U+D800"),
    "bad-missing-features": (json.dumps(reading(seq=91, **without("features"))),
                             "features: missing"),
    "bad-missing-id": (json.dumps(reading(seq=92, **without("id"))), "id: missing"),
    "bad-count": (json.dumps(reading(seq=93, features=[1.0] * 7)),
                  "features: expected 8 values, got 7"),
    "bad-nan": (json.dumps(reading(seq=94, features=[1.0, float("nan")] + [1.0] * 6)),
                "features[1] (peak): must be finite, got nan"),
    "bad-inf": (json.dumps(reading(seq=95, features=[float("inf")] + [1.0] * 7)),
                "features[0] (rms): must be finite, got inf"),
    "bad-string-feature": (json.dumps(reading(seq=96, features=["1.0"] + [1.0] * 7)),
                           "features[0] (rms): must be a number, got '1.0'"),
    "bad-bool-feature": (json.dumps(reading(seq=97, features=[1.0] * 7 + [True])),
                         "features[7] (temperature): must be a number, got true (booleans"),
    "bad-out-of-bounds": (json.dumps(reading(seq=98, features=[2e6] + [1.0] * 7)),
                          "features[0] (rms): 2e+06 is outside [-1e+06, 1e+06]"),
    "bad-id-empty": (json.dumps(reading(seq=99, id="")), "id: must be a non-empty string"),
    "bad-id-long": (json.dumps(reading(seq=100, id="x" * 129)), "at most 128 characters"),
    "bad-id-number": (json.dumps(reading(seq=101, id=7)), "id: must be a non-empty string"),
    "bad-label-on-unlabelled": (json.dumps(reading(seq=102, label=1)),
                                "label: model 'vibration-anomaly' takes no label"),
    "bad-type": (json.dumps(reading(seq=103, type="status")), "type: unknown type 'status'"),
    "bad-ts": (json.dumps(reading(seq=104, ts="yesterday")), "ts: must be epoch seconds"),
    "bad-oversized": (json.dumps(reading(seq=105, note="x" * (MAX_PAYLOAD_BYTES + 10))),
                      "over the 131,072-byte limit"),
}
BAD_UNKNOWN_MODEL = {
    "bad-unknown-model": (json.dumps(reading(model="lidar", seq=106)),
                          "model: unknown model 'lidar' (configured: digits, vibration-anomaly)"),
    "bad-no-model": (json.dumps(reading(seq=107, **without("model"))), "model: missing"),
}
# these are rejected before the body is parsed for its model... unless it names one
EXPECTED_FOLDER = {
    "bad-not-json": "_unknown", "bad-array": "_unknown",
}


def _mixed_batch() -> tuple[list[tuple[str, str]], int, int]:
    good = [(f"good-{i:03d}", json.dumps(reading(seq=i, thing=f"pump-{i % 3:03d}")))
            for i in range(40)]
    good += [(f"digit-{i:03d}", json.dumps(reading(model=DIGITS, seq=i, thing="cam-1")))
             for i in range(12)]
    summary = [("summary-1", json.dumps({"model": VIBRATION, "thing": "pump-001",
                                          "type": "summary", "received_at": RECEIVED_AT_MS,
                                          "window_s": 60, "anomalies": 2, "mean_score": 0.4}))]
    bad = [(mid, body) for mid, (body, _) in {**BAD_VIBRATION, **BAD_UNKNOWN_MODEL}.items()]
    messages = good + summary + bad
    random.Random(3).shuffle(messages)
    return messages, len(good), len(bad)


def test_mixed_batch_stores_every_record_once_with_readable_reasons(client, aws, settings):
    messages, n_good, n_bad = _mixed_batch()
    client.lambda_.invoke(HANDLER, _through_lambda_json(sqs_event(messages)))

    objects = all_objects(aws.s3, settings.bucket)
    lines = {key: read_lines(aws.s3, settings.bucket, key) for key in objects}
    raw = [r for key, rs in lines.items() if key.startswith("raw/") for r in rs]
    quarantined = [r for key, rs in lines.items() if key.startswith("quarantine/") for r in rs]
    summaries = [r for key, rs in lines.items() if key.startswith("summaries/") for r in rs]

    # nothing lost, nothing twice
    assert len(raw) + len(quarantined) + len(summaries) == len(messages)
    assert (len(raw), len(quarantined), len(summaries)) == (n_good, n_bad, 1)
    # one object per (kind, model): raw x2, summaries x1, quarantine for vibration + _unknown
    assert sorted(k.split("/")[0] + "/" + k.split("/")[1] for k in objects) == [
        "quarantine/_unknown", "quarantine/vibration-anomaly",
        "raw/digits", "raw/vibration-anomaly", "summaries/vibration-anomaly"]

    expected = {**BAD_VIBRATION, **BAD_UNKNOWN_MODEL}
    by_id = {q["message_id"]: q for q in quarantined}
    assert set(by_id) == set(expected)
    for message_id, (body, reason) in expected.items():
        q = by_id[message_id]
        assert reason in q["reason"], (message_id, q["reason"])
        if message_id == "bad-not-utf8":
            assert q["body_encoding"] == "base64"
            import base64
            assert base64.b64decode(q["body"]) == body.encode("utf-8", "surrogateescape")
        elif message_id == "bad-oversized":
            assert q["body_truncated"] is True
            assert "truncated" in q["reason"]
            assert q["body_bytes"] == len(body.encode())
            assert len(q["body"]) < 5000 and body.startswith(q["body"])
        else:
            assert q["body"] == body and q["body_truncated"] is False
        folder = EXPECTED_FOLDER.get(message_id)
        if folder is None:
            folder = "_unknown" if message_id in BAD_UNKNOWN_MODEL else VIBRATION
        assert q["model"] == folder, message_id

    # accepted readings are normalised to the contract's shape
    vib = next(r for r in raw if r["id"] == "pump-001-1")
    assert vib == {"id": "pump-001-1", "thing": "pump-001", "model": VIBRATION,
                   "ts": 1_767_268_800.5, "received_at": RECEIVED_AT_MS,
                   "features": [0.501 + i for i in range(8)]}
    digit = next(r for r in raw if r["model"] == DIGITS and r["id"] == "cam-1-3")
    assert digit["label"] == 3 and len(digit["features"]) == 64
    assert all(isinstance(v, float) for v in digit["features"])
    assert summaries[0]["anomalies"] == 2


def test_record_count_metadata_and_partition_from_received_at(client, aws, settings):
    messages, _, _ = _mixed_batch()
    client.lambda_.invoke(HANDLER, _through_lambda_json(sqs_event(messages)))
    batch_id = batch_id_for([SqsMessage(m, b) for m, b in
                             _through_lambda_json({"m": messages})["m"]])
    for key in all_objects(aws.s3, settings.bucket):
        head = aws.s3.head_object(Bucket=settings.bucket, Key=key)
        assert int(head["Metadata"]["record-count"]) == len(read_lines(aws.s3, settings.bucket, key))
        assert key.endswith(f"/{batch_id}.jsonl.gz")
        # every record carries received_at 2026-01-01T12:00Z or none (SentTimestamp, same hour)
        assert "/dt=2026-01-01/hour=12/" in key


def test_replayed_batch_writes_nothing_new(client, aws, settings):
    messages, _, _ = _mixed_batch()
    client.lambda_.invoke(HANDLER, _through_lambda_json(sqs_event(messages)))
    before = all_objects(aws.s3, settings.bucket)
    etags = {k: aws.s3.head_object(Bucket=settings.bucket, Key=k)["ETag"] for k in before}

    # a redelivery may come in another order and with other receipt handles
    replay = list(messages)
    random.Random(11).shuffle(replay)
    puts = _count_puts(aws.s3)
    client.lambda_.invoke(HANDLER, _through_lambda_json(sqs_event(replay)))

    after = all_objects(aws.s3, settings.bucket)
    assert after == before
    assert {k: aws.s3.head_object(Bucket=settings.bucket, Key=k)["ETag"] for k in after} == etags
    # the conditional PUTs were tried and refused: no new object version, no new S3 event
    assert puts["ok"] == 0 and puts["attempts"] == len(before)


def test_one_put_per_model_per_batch(aws, settings, runtime):
    puts = _count_puts(aws.s3)
    messages = [SqsMessage(f"m-{i:05d}", json.dumps(reading(seq=i)), SENT_AT_MS)
                for i in range(2000)]
    messages += [SqsMessage(f"d-{i:05d}", json.dumps(reading(model=DIGITS, seq=i)), SENT_AT_MS)
                 for i in range(500)]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config)
    assert result.accepted == {VIBRATION: 2000, DIGITS: 500}
    assert puts["attempts"] == 2 and result.puts == 2


def test_digits_label_rules(aws, settings, runtime):
    cases = {
        "ok-labelled": (reading(model=DIGITS, seq=1), None),
        "no-label": (reading(model=DIGITS, seq=2, **without("label")),
                     "label: required by model 'digits' but missing"),
        "null-label": (reading(model=DIGITS, seq=3, label=None),
                       "label: required by model 'digits' but null"),
        "label-11": (reading(model=DIGITS, seq=4, label=11), "label: 11 is not one of"),
        "label-bool": (reading(model=DIGITS, seq=5, label=True), "label: must be a whole number"),
        "label-float": (reading(model=DIGITS, seq=6, label=3.0), "label: must be a whole number"),
        "pixel-17": (reading(model=DIGITS, seq=7, features=[17] + [0] * 63),
                     "features[0] (px0): 17 is outside [0, 16]"),
        "pixel-negative": (reading(model=DIGITS, seq=8, features=[0] * 63 + [-1]),
                           "features[63] (px63): -1 is outside [0, 16]"),
        "wrong-count": (reading(model=DIGITS, seq=9, features=[0] * 8),
                        "features: expected 64 values, got 8"),
    }
    messages = [SqsMessage(mid, json.dumps(body), SENT_AT_MS) for mid, (body, _) in cases.items()]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config)
    assert result.accepted == {DIGITS: 1} and result.quarantined == {DIGITS: 8}
    key = next(o.key for o in result.objects if o.kind == "quarantine")
    reasons = {q["message_id"]: q["reason"] for q in read_lines(aws.s3, settings.bucket, key)}
    for mid, (_, reason) in cases.items():
        if reason is not None:
            assert reason in reasons[mid], (mid, reasons[mid])


def test_partition_falls_back_to_sent_timestamp_without_received_at(aws, settings, runtime):
    late = 1_767_312_000_000 + 5_000  # 2026-01-02T00:00:05Z: SQS got it just after midnight
    messages = [SqsMessage("a", json.dumps(reading(seq=1, **without("received_at"))), late)]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config,
                             now_ms=0)
    (stored,) = result.objects
    assert "/dt=2026-01-02/hour=00/" in stored.key
    assert read_lines(aws.s3, settings.bucket, stored.key)[0]["received_at"] == late


def test_object_partition_is_the_batch_earliest_arrival(aws, settings, runtime):
    # a batch that straddles an hour stays one object, filed under its earliest record
    early, late = RECEIVED_AT_MS - 1000, RECEIVED_AT_MS + 3_600_000
    messages = [SqsMessage("b", json.dumps(reading(seq=2, received_at=late)), SENT_AT_MS),
                SqsMessage("a", json.dumps(reading(seq=1, received_at=early)), SENT_AT_MS)]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config)
    (stored,) = result.objects
    assert "/dt=2026-01-01/hour=11/" in stored.key
    rows = read_lines(aws.s3, settings.bucket, stored.key)
    assert [r["received_at"] for r in rows] == [early, late]  # sorted by message id


def test_batch_id_ignores_order_but_not_content() -> None:
    a = [SqsMessage("1", "x"), SqsMessage("2", "y")]
    assert batch_id_for(a) == batch_id_for(list(reversed(a)))
    assert batch_id_for(a) != batch_id_for(a[:1])
    # chalice's generate_sqs_event gives every message the id 'message-id'
    assert batch_id_for([SqsMessage("message-id", "x")]) != batch_id_for(
        [SqsMessage("message-id", "y")])


def test_generated_sqs_event_through_the_test_client(client, aws, settings):
    bodies = [json.dumps(reading(seq=i)) for i in range(5)] + ["oops"]
    client.lambda_.invoke(HANDLER, client.events.generate_sqs_event(bodies,
                                                                    queue_name="telemetry"))
    objects = all_objects(aws.s3, settings.bucket)
    counts = {k.split("/")[0]: len(read_lines(aws.s3, settings.bucket, k)) for k in objects}
    assert counts == {"raw": 5, "quarantine": 1}


def test_lazy_runtime_reads_the_stage_environment(aws):
    """Without injection the handler builds its runtime from .chalice/config.json's stage."""
    from app import app

    set_runtime(None)
    aws.s3.create_bucket(Bucket="mledge-dev-data")  # the dev stage's bucket
    try:
        with Client(app, stage_name="dev") as test_client:
            test_client.lambda_.invoke(HANDLER, sqs_event([("m1", json.dumps(reading()))]))
        keys = list(all_objects(aws.s3, "mledge-dev-data"))
        assert len(keys) == 1 and keys[0].startswith("raw/vibration-anomaly/")
    finally:
        set_runtime(None)


def test_s3_refusal_fails_the_batch(aws, runtime):
    messages = [SqsMessage("a", json.dumps(reading()), SENT_AT_MS)]
    with pytest.raises(IngestError, match=r"s3://no-such-bucket/raw/.*NoSuchBucket"):
        ingest_messages(messages, s3=aws.s3, bucket="no-such-bucket", config=runtime.config)


def emf_blobs(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if '"_aws"' in line]


def test_emf_metrics_per_model_and_per_stage(aws, settings, runtime, capsys):
    metrics = EmfIngestMetrics(settings.stage)
    summary = {"type": "summary", "thing": "t-1", "readings": 200, "anomalies": 10}
    messages = [SqsMessage("a", json.dumps(reading()), SENT_AT_MS),
                SqsMessage("b", "nope", SENT_AT_MS),
                SqsMessage("c", json.dumps(reading(model=DIGITS)), SENT_AT_MS),
                SqsMessage("s", json.dumps({**reading(), **summary}), SENT_AT_MS),
                # A summary with nonsense counts is stored but not counted.
                SqsMessage("z", json.dumps({**reading(seq=9), **summary, "anomalies": 500,
                                            "readings": 5}), SENT_AT_MS)]
    ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config,
                    metrics=metrics)
    capsys.readouterr()
    ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=runtime.config,
                    metrics=metrics)
    assert emf_blobs(capsys.readouterr().out) == []  # a replay stored nothing, counts nothing

    ingest_messages([*messages, SqsMessage("d", json.dumps(reading(seq=2)), SENT_AT_MS)],
                    s3=aws.s3, bucket=settings.bucket, config=runtime.config, metrics=metrics)
    blobs = emf_blobs(capsys.readouterr().out)
    by_model = {b["model"]: b for b in blobs if "model" in b}
    stage_wide = [b for b in blobs if "model" not in b]
    assert set(by_model) == {VIBRATION, DIGITS, "_unknown"}
    assert by_model[VIBRATION]["RecordsAccepted"] == [2.0]
    assert by_model[VIBRATION]["SummariesStored"] == [2.0]
    assert by_model[VIBRATION]["DeviceReadings"] == [200.0]
    assert by_model[VIBRATION]["DeviceAnomalyRate"] == [5.0]
    assert by_model["_unknown"]["RecordsQuarantined"] == [1.0]
    spec = by_model[DIGITS]["_aws"]["CloudWatchMetrics"][0]
    assert spec["Namespace"] == "MLEdgeDeployTest"
    assert sorted(spec["Dimensions"][0]) == ["model", "service", "stage"]
    # The stage-wide copies (what the alarms read) carry no model dimension.
    assert len(stage_wide) == 3 and all(b["stage"] == settings.stage for b in stage_wide)
    assert sorted(stage_wide[0]["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]) == [
        "service", "stage"]
    assert sum(b.get("RecordsQuarantined", [0])[0] for b in stage_wide) == 1


def _count_puts(s3: Any) -> dict[str, int]:
    """Count PutObject calls on a client with botocore's event hooks."""
    counts = {"attempts": 0, "ok": 0}

    def before(**_: Any) -> None:
        counts["attempts"] += 1

    def after(http_response: Any, **_: Any) -> None:
        if http_response.status_code == 200:
            counts["ok"] += 1

    s3.meta.events.register("before-call.s3.PutObject", before)
    s3.meta.events.register("after-call.s3.PutObject", after)
    return counts
