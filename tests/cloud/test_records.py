"""One message at a time: chalicelib.records.classify_message's verdicts and reasons."""

from __future__ import annotations

import copy
import json
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.config import PipelineConfig, load_pipeline_config, parse_pipeline_config
from chalicelib.records import Reading, Rejection, Summary, classify_message
from chalicelib.settings import DEFAULT_PIPELINE_CONFIG
from tests.cloud.ingest_helpers import (
    DIGITS,
    RECEIVED_AT_MS,
    SENT_AT_MS,
    VIBRATION,
    reading,
    without,
)

CONFIG = load_pipeline_config(DEFAULT_PIPELINE_CONFIG)


def _classify(body: object, config: PipelineConfig = CONFIG):
    text = body if isinstance(body, str) else json.dumps(body)
    return classify_message(text, "msg-1", SENT_AT_MS, config)


def _optional_label_config() -> PipelineConfig:
    raw = tomllib.loads(DEFAULT_PIPELINE_CONFIG.read_text())
    raw = copy.deepcopy(raw)
    raw["models"][DIGITS]["schema"]["label"] = "optional"
    return parse_pipeline_config(raw)


@pytest.mark.parametrize(("body", "reason"), [
    (reading(features=[1.0] * 9), "features: expected 8 values, got 9"),
    (reading(features=[]), "features: expected 8 values, got 0"),
    (reading(features={"rms": 1}), "features: must be a list of 8 numbers, got an object"),
    (reading(features=None), "features: must be a list of 8 numbers, got null"),
    (reading(features=[10**400] + [0] * 7), "features[0] (rms): 1000000000"),
    (reading(features=[1e308] * 8, ), "features[0] (rms): 1e+308 is outside"),
    (reading(features=[[1]] + [0] * 7), "features[0] (rms): must be a number, got an array"),
    (reading(thing=""), "thing: must be an IoT thing name"),
    (reading(thing="a/b"), "thing: must be an IoT thing name"),
    (reading(**without("thing")), "thing: must be an IoT thing name"),
    (reading(received_at="now"), "received_at: must be epoch milliseconds"),
    (reading(received_at=-5), "received_at: must be epoch milliseconds"),
    (reading(**without("type")), "type: unknown type null"),
    (reading(**without("ts")), "ts: missing"),
    (reading(ts=float("nan")), "ts: must be epoch seconds (a finite number), got nan"),
    (reading(ts=True), "ts: must be epoch seconds (a finite number), got true"),
    (reading(model=7), "model: unknown model 7"),
    ('"just a string"', "body: must be a JSON object, got a string"),
    ("", "body: not JSON"),
    ({"model": VIBRATION, "thing": "t", "type": "summary", "mean": float("nan")},
     "body: Out of range float values are not JSON compliant"),
])
def test_rejections_name_the_field(body: object, reason: str) -> None:
    outcome = _classify(body)
    assert isinstance(outcome, Rejection), outcome
    assert reason in outcome.reason
    line = json.loads(outcome.line)
    assert line["reason"] == outcome.reason and line["message_id"] == "msg-1"


def test_non_string_body_is_quarantined() -> None:
    outcome = classify_message(None, "m", SENT_AT_MS, CONFIG)
    assert isinstance(outcome, Rejection) and "body: must be a string" in outcome.reason


def test_reading_is_normalised_and_unknown_fields_dropped() -> None:
    outcome = _classify(reading(seq=1, features=[1, 2, 3, 4, 5, 6, 7, 8], extra="ignored",
                                model_version=3, score=0.25, anomaly=False))
    assert isinstance(outcome, Reading)
    assert outcome.model == VIBRATION and outcome.arrival_ms == RECEIVED_AT_MS
    assert json.loads(outcome.line) == {
        "id": "pump-001-1", "thing": "pump-001", "model": VIBRATION, "ts": 1_767_268_800.5,
        "received_at": RECEIVED_AT_MS, "features": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        "model_version": 3, "score": 0.25, "anomaly": False}


def test_ill_typed_device_diagnostics_are_dropped_not_the_reading() -> None:
    outcome = _classify(reading(model_version="3", score=float("nan"), anomaly="yes"))
    assert isinstance(outcome, Reading)
    assert not {"model_version", "score", "anomaly"} & set(json.loads(outcome.line))


def test_received_at_falls_back_to_sent_timestamp() -> None:
    outcome = _classify(reading(**without("received_at")))
    assert isinstance(outcome, Reading) and outcome.arrival_ms == SENT_AT_MS
    assert json.loads(outcome.line)["received_at"] == SENT_AT_MS


def test_optional_label() -> None:
    config = _optional_label_config()
    unlabelled = _classify(reading(model=DIGITS, **without("label")), config)
    assert isinstance(unlabelled, Reading) and "label" not in json.loads(unlabelled.line)
    labelled = _classify(reading(model=DIGITS, label=4), config)
    assert isinstance(labelled, Reading) and json.loads(labelled.line)["label"] == 4
    bad = _classify(reading(model=DIGITS, label=12), config)
    assert isinstance(bad, Rejection) and "label: 12 is not one of" in bad.reason


def test_null_label_is_no_label_for_unlabelled_models() -> None:
    assert isinstance(_classify(reading(label=None)), Reading)


def test_summary_is_kept_as_received() -> None:
    body = {"model": DIGITS, "thing": "cam-1", "type": "summary", "counts": {"3": 7}}
    outcome = _classify(body)
    assert isinstance(outcome, Summary) and outcome.model == DIGITS
    assert json.loads(outcome.line) == body
    assert outcome.arrival_ms == SENT_AT_MS


def test_exactly_at_the_size_limit_is_accepted() -> None:
    body = reading(note="")
    text = json.dumps(body)
    text = json.dumps(reading(note="x" * (128 * 1024 - len(text))))
    assert len(text.encode()) == 128 * 1024
    assert isinstance(_classify(text), Reading)
    over = json.dumps(reading(note="x" * (128 * 1024 - len(json.dumps(body)) + 1)))
    outcome = _classify(over)
    assert isinstance(outcome, Rejection) and outcome.model == VIBRATION
    assert json.loads(outcome.line)["body_truncated"] is True


# ---- why the device sent it (mledge_update.uplink): the record's training weight


@pytest.mark.parametrize(("reason", "p"), [("no-model", 1.0), ("flagged", 1), ("sample", 0.02)])
def test_uplink_reason_and_inclusion_probability_are_kept(reason: str, p: float) -> None:
    outcome = _classify(reading(reason=reason, inclusion_p=p))
    assert isinstance(outcome, Reading)
    line = json.loads(outcome.line)
    assert (line["reason"], line["inclusion_p"]) == (reason, float(p))


@pytest.mark.parametrize(("fields", "reason"), [
    ({"reason": "sample"}, "inclusion_p: missing"),
    ({"inclusion_p": 0.5}, "reason: missing"),
    ({"reason": "bored", "inclusion_p": 1}, "reason: must be one of flagged, no-model, sample"),
    ({"reason": "sample", "inclusion_p": 0}, "inclusion_p: must be a probability in (0, 1]"),
    ({"reason": "sample", "inclusion_p": 1.5}, "inclusion_p: must be a probability in (0, 1]"),
    ({"reason": "sample", "inclusion_p": True}, "inclusion_p: must be a probability in (0, 1]"),
    ({"reason": "sample", "inclusion_p": "0.1"}, "inclusion_p: must be a probability in (0, 1]"),
    ({"reason": "flagged", "inclusion_p": 0.5}, "a 'flagged' reading is always sent (1)"),
])
def test_a_wrong_weight_is_quarantined_not_trained_on(fields: dict, reason: str) -> None:
    outcome = _classify(reading(**fields))
    assert isinstance(outcome, Rejection), outcome
    assert reason in outcome.reason


@settings(max_examples=200, deadline=None)
@given(reason=st.one_of(st.sampled_from(["no-model", "sample", "flagged", "summary", ""]),
                        st.text(max_size=8), st.integers(), st.none()),
       p=st.one_of(st.floats(allow_nan=False), st.integers(-2, 2), st.booleans(),
                   st.text(max_size=4), st.none()))
def test_any_reason_and_probability_is_kept_valid_or_quarantined(reason: object,
                                                                 p: object) -> None:
    outcome = _classify(reading(reason=reason, inclusion_p=p))
    valid = (reason in ("no-model", "sample", "flagged") and type(p) in (int, float)
             and 0 < p <= 1 and (reason == "sample" or p == 1))
    if valid:
        assert isinstance(outcome, Reading)
        assert json.loads(outcome.line)["inclusion_p"] == float(p)
    else:
        assert isinstance(outcome, Rejection)
        assert outcome.reason.startswith(("reason:", "inclusion_p:"))
