"""Telemetry from outside: no record's content may fail its SQS batch.

Regression tests for inputs that used to raise (and so sent a whole batch of good
readings to the DLQ), then hypothesis properties: every body is exactly one of
Reading / Summary / Rejection, every Lambda SQS envelope yields one message per
record, and a batch stores count in == raw + summaries + quarantine.
"""

from __future__ import annotations

import copy
import json
import math
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chalicelib.config import PipelineConfig, load_pipeline_config, parse_pipeline_config
from chalicelib.ingest import (
    IngestError,
    SqsMessage,
    ingest_messages,
    ingest_sqs_event,
    messages_from_event,
)
from chalicelib.records import (
    MAX_RECEIVED_AT_SKEW_MS,
    Reading,
    Rejection,
    Summary,
    classify_message,
)
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from tests.cloud.ingest_helpers import (
    DIGITS,
    SENT_AT_MS,
    VIBRATION,
    read_lines,
    reading,
    sqs_event,
)
from tests.fuzz_strategies import json_values, nasty_numbers, nasty_text

CONFIG = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)


def _classify(body: Any, fallback_ms: int = SENT_AT_MS):
    text = body if isinstance(body, str) else json.dumps(body)
    return classify_message(text, "msg-1", fallback_ms, CONFIG)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------- poisoned records


RECORD_FIELDS = ("id", "ts", "features", "label", "model", "thing", "type", "received_at",
                 "score", "model_version", "anomaly")


def _poison(record: dict[str, Any], field: str, how: str, value: Any, index: int
            ) -> dict[str, Any]:
    record = copy.deepcopy(record)
    if how == "drop":
        record.pop(field, None)
    elif how == "feature" and isinstance(record.get("features"), list):
        features = record["features"]
        features[index % len(features)] = value
    else:
        record[field] = value
    return record


def poisoned_record() -> st.SearchStrategy[dict[str, Any]]:
    """A valid IoT-rule output for one of the example models with one to three fields spoiled."""
    base = st.builds(lambda model, seq: reading(model=model, seq=seq),
                     st.sampled_from([VIBRATION, DIGITS]), st.integers(0, 1000))
    spoil: st.SearchStrategy[Callable[[dict[str, Any]], dict[str, Any]]] = st.builds(
        lambda field, how, value, index: lambda r: _poison(r, field, how, value, index),
        st.sampled_from(RECORD_FIELDS), st.sampled_from(["set", "drop", "feature"]),
        st.one_of(json_values(6), nasty_numbers()), st.integers(0, 63))

    def apply(record: dict[str, Any], spoils: list[Callable[[dict[str, Any]], dict[str, Any]]]
              ) -> dict[str, Any]:
        for spoiler in spoils:
            record = spoiler(record)
        return record

    return st.builds(apply, base, st.lists(spoil, min_size=1, max_size=3))


# ------------------------------------------------------------- what used to raise


@pytest.mark.parametrize("body", [
    _nested(60_000),
    '{"model": "vibration-anomaly", "x": ' + _nested(5_000) + "}",
    '{"model": "vibration-anomaly", "type": "summary", "thing": "t", "deep": '
    + _nested(900) + "}",
], ids=["array", "inside-a-record", "summary"])
def test_deeply_nested_json_is_quarantined(body: str) -> None:
    outcome = _classify(body)
    assert isinstance(outcome, Rejection), outcome
    assert "nested" in outcome.reason


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("ts", 10**400, "ts: "),
    ("ts", -(10**309), "ts: "),
    ("received_at", 10**400, "received_at: "),
    ("received_at", 1e300, "received_at: "),
    ("received_at", 253_402_300_800_000, "received_at: "),  # year 10000: no partition date
    ("received_at", SENT_AT_MS + MAX_RECEIVED_AT_SKEW_MS + 1, "received_at: "),
])
def test_numbers_out_of_range_are_quarantined(field: str, value: Any, reason: str) -> None:
    outcome = _classify(reading(**{field: value}))
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason.startswith(reason), outcome.reason


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**309])
def test_huge_score_is_dropped_not_the_reading(value: int) -> None:
    outcome = _classify(reading(score=value, model_version=10**400))
    assert isinstance(outcome, Reading), outcome
    assert not {"score", "model_version"} & set(json.loads(outcome.line))


def _any_label_config() -> PipelineConfig:
    raw = tomllib.loads(DEFAULT_PIPELINE_CONFIG.read_text())
    del raw["models"][DIGITS]["schema"]["label_values"]
    return parse_pipeline_config(raw)


@pytest.mark.parametrize("label", [10**30, -(2**63) - 1, 2**63])
def test_label_outside_int64_is_quarantined(label: int) -> None:
    # the trainer holds labels in an int64 array: one such label would fail the training
    outcome = classify_message(json.dumps(reading(model=DIGITS, label=label)), "m", SENT_AT_MS,
                               _any_label_config())
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason.startswith("label: ")


@pytest.mark.parametrize("thing", ["pump-001\n", "pump\n001", "\npump", "pump-001\r", "p" * 129])
def test_thing_name_must_match_exactly(thing: str) -> None:
    outcome = _classify(reading(thing=thing))
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason.startswith("thing: ")


def test_far_future_received_at_does_not_fail_the_batch(aws, settings) -> None:
    messages = [SqsMessage("a", json.dumps(reading(seq=1)), SENT_AT_MS),
                SqsMessage("b", json.dumps(reading(seq=2, received_at=10**17)), SENT_AT_MS),
                SqsMessage("c", json.dumps(reading(seq=3, ts=10**400)), SENT_AT_MS),
                SqsMessage("d", _nested(50_000), SENT_AT_MS)]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=CONFIG)
    assert result.accepted == {VIBRATION: 1}
    assert sum(result.quarantined.values()) == 3


@pytest.mark.parametrize("sent", ["99999999999999999999999", "²", "-5", "1e3", None, 12.5,
                                  ["1"], ""])
def test_odd_sent_timestamp_falls_back_to_now(sent: Any, aws, settings) -> None:
    event = sqs_event([("m1", json.dumps(reading(received_at=None)))])
    event["Records"][0]["attributes"]["SentTimestamp"] = sent
    (message,) = messages_from_event(event)
    assert message.sent_timestamp_ms is None
    result = ingest_sqs_event(event, clients=aws, settings=settings, config=CONFIG,
                              now_ms=SENT_AT_MS)
    assert result.accepted == {VIBRATION: 1}


def test_malformed_envelope_records_are_quarantined_not_dropped(aws, settings) -> None:
    event = sqs_event([("ok", json.dumps(reading()))])
    event["Records"] += [None, "text", 7, {"messageId": ["x"]}, {"attributes": "x"}]
    result = ingest_sqs_event(event, clients=aws, settings=settings, config=CONFIG)
    assert result.received == 6
    assert result.accepted == {VIBRATION: 1}
    assert sum(result.quarantined.values()) == 5


@pytest.mark.parametrize("event", [None, [], "x", {"Records": None}, {"Records": {"a": 1}},
                                   {"Records": "abc"}])
def test_event_without_a_records_list_is_an_empty_batch(event: Any) -> None:
    assert messages_from_event(event) == []


# ------------------------------------------------------------------- properties


def _check_outcome(outcome: Any, fallback_ms: int) -> None:
    assert type(outcome) in (Reading, Summary, Rejection)
    line = json.loads(outcome.line)  # always one valid JSON line
    assert "\n" not in outcome.line
    assert outcome.model == VIBRATION or outcome.model == DIGITS or outcome.model == "_unknown"
    assert 0 <= outcome.arrival_ms <= fallback_ms + MAX_RECEIVED_AT_SKEW_MS
    if type(outcome) is Rejection:
        assert line["reason"] == outcome.reason and outcome.reason
    if type(outcome) is Reading:
        assert all(math.isfinite(v) for v in line["features"])


@given(body=st.one_of(nasty_text(), json_values().map(json.dumps),
                      poisoned_record().map(lambda r: json.dumps(r, ensure_ascii=False)),
                      json_values()),
       fallback_ms=st.integers(0, 4_102_444_800_000))
def test_every_body_is_a_reading_a_summary_or_a_rejection(body: Any, fallback_ms: int) -> None:
    _check_outcome(classify_message(body, "m", fallback_ms, CONFIG), fallback_ms)


@given(record=poisoned_record())
def test_a_poisoned_reading_is_classified(record: dict[str, Any]) -> None:
    for text in (json.dumps(record), json.dumps(record, ensure_ascii=False)):
        _check_outcome(classify_message(text, "m", SENT_AT_MS, CONFIG), SENT_AT_MS)


_envelope_record = st.one_of(
    json_values(),
    st.fixed_dictionaries({}, optional={
        "messageId": st.one_of(nasty_text(), json_values()),
        "body": st.one_of(nasty_text(), poisoned_record().map(json.dumps), json_values()),
        "attributes": st.one_of(
            json_values(),
            st.fixed_dictionaries({}, optional={"SentTimestamp": st.one_of(
                nasty_text(), nasty_numbers(), st.integers().map(str))})),
    }),
)


@given(event=st.one_of(json_values(), st.fixed_dictionaries(
    {"Records": st.lists(_envelope_record, max_size=8)})))
def test_every_sqs_envelope_yields_one_message_per_record(event: Any) -> None:
    messages = messages_from_event(event)
    records = event.get("Records") if isinstance(event, dict) else None
    assert len(messages) == (len(records) if isinstance(records, list) else 0)
    for message in messages:
        assert isinstance(message.message_id, str)
        assert message.sent_timestamp_ms is None or message.sent_timestamp_ms >= 0


@given(bodies=st.lists(st.one_of(poisoned_record().map(json.dumps), nasty_text(),
                                 st.builds(lambda i: json.dumps(reading(seq=i)),
                                           st.integers(0, 50))),
                       max_size=12),
       sent=st.one_of(st.none(), st.integers(0, 4_102_444_800_000)))
def test_ingest_stores_every_message_exactly_once(aws, settings, bodies: list[str],
                                                   sent: int | None) -> None:
    messages = [SqsMessage(f"m{i}", body, sent) for i, body in enumerate(bodies)]
    result = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=CONFIG,
                             now_ms=SENT_AT_MS)
    assert result.received == len(bodies) == result.stored
    stored = 0
    for obj in result.objects:
        lines = read_lines(aws.s3, settings.bucket, obj.key)
        assert len(lines) == obj.record_count
        stored += len(lines)
    assert stored == len(bodies)
    # replay: the same keys, nothing new written
    again = ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=CONFIG,
                            now_ms=SENT_AT_MS + 99)
    assert [o.key for o in again.objects] == [o.key for o in result.objects]
    assert not any(o.written for o in again.objects)


@given(records=st.lists(_envelope_record, max_size=8))
def test_any_lambda_event_stores_every_record(aws, settings, records: list[Any]) -> None:
    result = ingest_sqs_event({"Records": records}, clients=aws, settings=settings,
                              config=CONFIG, now_ms=SENT_AT_MS)
    assert result.received == len(records) == result.stored
    assert sum(o.record_count for o in result.objects) == len(records)


def test_the_batch_fails_only_when_s3_refuses(aws, settings) -> None:
    messages = [SqsMessage("a", _nested(10_000), SENT_AT_MS),
                SqsMessage("b", json.dumps(reading(ts=10**400)), SENT_AT_MS)]
    ingest_messages(messages, s3=aws.s3, bucket=settings.bucket, config=CONFIG)
    with pytest.raises(IngestError):
        ingest_messages(messages, s3=aws.s3, bucket="no-such-bucket", config=CONFIG)
