"""Validation and normalisation of one telemetry message (one SQS body = one IoT-rule output).

`classify_message` never raises on bad input: every body ends up as exactly one of
`Reading` (goes to `raw/`), `Summary` (goes to `summaries/`) or `Rejection` (goes to
`quarantine/` with a readable reason). The first problem found is the reason.

What a body is (the telemetry record, docs/ingestion.md): the device's JSON object
`{"id", "ts", "features", "label"?, "model_version"?, "score"?, "anomaly"?, "reason"?,
"inclusion_p"?}` (the last two: `mledge_update.uplink`) plus the
fields the IoT rule adds: `model`, `thing`, `type` (topic segments) and `received_at`
(epoch milliseconds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from mledge_update.iot_jobs import THING_NAME
from mledge_update.uplink import (
    INCLUSION_FIELD,
    REASON_FIELD,
    UplinkFieldError,
    check_uplink_fields,
)

from chalicelib.config import FeatureSchema, PipelineConfig
from chalicelib.untrusted import safe_repr, shown

MAX_PAYLOAD_BYTES = 128 * 1024
"""IoT Core's MQTT payload limit; a larger body cannot be a genuine device message."""
MAX_ID_CHARS = 128
MAX_FLOAT = 1.7976931348623157e308
"""Numbers beyond this (huge JSON integers) do not fit a float: not a timestamp or a score."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Labels and model versions must fit the trainer's int64 arrays."""
MAX_RECEIVED_AT_SKEW_MS = 24 * 3600 * 1000
"""How far `received_at` may lie after the ingest Lambda's clock (clock skew allowance);
later cannot be IoT Core's arrival time, and a far-future one has no partition date."""
MAX_ARRIVAL_MS = 253_402_300_799_999
"""The last millisecond of 9999-12-31: the latest arrival a `dt=YYYY-MM-DD` partition can name."""
MAX_SUMMARY_DEPTH = 32
"""Summaries are stored as received; a device summary is flat, and re-encoding a value nested
near Python's recursion limit would raise instead of storing."""
QUARANTINE_BODY_CHARS = 4096
"""How much of an oversized body the quarantine line keeps (its sha256 covers all of it)."""
UNKNOWN_MODEL = "_unknown"
"""The quarantine folder for records that name no configured model."""
TELEMETRY = "telemetry"
SUMMARY = "summary"

_NUMBER_TYPES = frozenset((int, float))
_REPLACEMENT_CHAR = "\ufffd"
# One reusable encoder: strict JSON (no NaN) and compact lines.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DECODE = json.JSONDecoder().decode


class RecordError(ValueError):
    """A message that cannot be accepted; `str()` is the reason written to quarantine."""


@dataclass(frozen=True, slots=True)
class Reading:
    """A valid telemetry reading: `line` is the normalised JSON line for `raw/`."""

    model: str
    arrival_ms: int
    line: str


@dataclass(frozen=True, slots=True)
class Summary:
    """A device summary (`type == "summary"`): any JSON object, kept as received."""

    model: str
    arrival_ms: int
    line: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that failed validation; `line` is the quarantine JSON line."""

    model: str
    arrival_ms: int
    reason: str
    line: str


Outcome = Reading | Summary | Rejection


def classify_message(body: Any, message_id: str, fallback_arrival_ms: int,
                     config: PipelineConfig, *, now_ms: int | None = None) -> Outcome:
    """Validate one SQS message body and say where it goes.

    `fallback_arrival_ms` is used for the partition (and the normalised
    `received_at`) when the body carries no `received_at`: the caller passes the
    SQS `SentTimestamp`, which is the same on every redelivery of the message. It
    must lie in [0, MAX_ARRIVAL_MS - MAX_RECEIVED_AT_SKEW_MS] (`ingest` makes sure).
    A `received_at` later than `now_ms` (default: the fallback) plus
    MAX_RECEIVED_AT_SKEW_MS is rejected.

    Never raises for any `body`: deep nesting, numbers that fit no float and any
    character end in a Rejection with the reason.
    """
    if not isinstance(body, str):
        return _reject(UNKNOWN_MODEL, fallback_arrival_ms, message_id,
                       safe_repr(body).encode("utf-8", "backslashreplace"),
                       f"body: must be a string, got {type(body).__name__}")
    if body.isascii():  # O(1) in CPython: the common case needs no encoding or scan
        size = len(body)
    else:
        try:
            size = len(body.encode("utf-8"))
        except UnicodeEncodeError as exc:
            # A Lambda event is JSON; a body whose bytes were not UTF-8 reaches Python as a
            # str with lone surrogates (a `\udcXX` escape in the event): not encodable.
            errors = "surrogateescape" if _escapable(body) else "surrogatepass"
            return _reject(_claimed_model(body, config), fallback_arrival_ms, message_id,
                           body.encode("utf-8", errors),
                           f"body: not valid UTF-8 (lone surrogate U+{ord(body[exc.start]):04X} "
                           f"at character {exc.start}); original bytes kept base64-encoded",
                           binary=True)
        if _REPLACEMENT_CHAR in body:
            return _reject(_claimed_model(body, config), fallback_arrival_ms, message_id, body,
                           "body: contains U+FFFD replacement characters (bytes that were not "
                           "UTF-8 were replaced before SQS); the record cannot be trusted")
    if size > MAX_PAYLOAD_BYTES:
        return _reject(_claimed_model(body, config), fallback_arrival_ms, message_id, body,
                       f"payload: {size:,} bytes is over the {MAX_PAYLOAD_BYTES:,}-byte "
                       f"limit (IoT Core's maximum); body truncated to its first "
                       f"{QUARANTINE_BODY_CHARS:,} characters, body_sha256 covers all of it")
    try:
        obj = _DECODE(body)
    except ValueError as exc:
        return _reject(UNKNOWN_MODEL, fallback_arrival_ms, message_id, body,
                       f"body: not JSON ({exc})")
    except RecursionError:  # the C decoder gives up near Python's recursion limit (~1,000)
        return _reject(UNKNOWN_MODEL, fallback_arrival_ms, message_id, body,
                       "body: JSON nested too deeply to parse")
    if not isinstance(obj, dict):
        return _reject(UNKNOWN_MODEL, fallback_arrival_ms, message_id, body,
                       f"body: must be a JSON object, got {_json_type(obj)}")
    model_name = obj.get("model")
    model = config.models.get(model_name) if isinstance(model_name, str) else None
    folder = model.name if model is not None else UNKNOWN_MODEL
    arrival_ms = fallback_arrival_ms
    try:
        if "\\u" in body:
            _check_unicode(obj)
        if model is None:
            if model_name is None:
                raise RecordError("model: missing (the IoT rule adds it from the topic)")
            known = ", ".join(sorted(config.models))
            raise RecordError(f"model: unknown model {_show(model_name)} (configured: {known})")
        arrival_ms = _received_at(obj, fallback_arrival_ms,
                                  fallback_arrival_ms if now_ms is None else now_ms)
        kind = obj.get("type")
        thing = obj.get("thing")
        if not isinstance(thing, str) or not THING_NAME.fullmatch(thing):
            raise RecordError(f"thing: must be an IoT thing name (1-128 of a-z A-Z 0-9 : _ -), "
                              f"got {_show(thing)}")
        if kind == SUMMARY:
            if _deeper_than(obj, MAX_SUMMARY_DEPTH):
                raise RecordError(f"summary: nested deeper than {MAX_SUMMARY_DEPTH} levels")
            return Summary(folder, arrival_ms, _ENCODE(obj))
        if kind != TELEMETRY:
            raise RecordError(f"type: unknown type {_show(kind)} (expected "
                              f"'{TELEMETRY}' or '{SUMMARY}')")
        line = normalise_reading(obj, model.name, model.schema, thing, arrival_ms)
    except RecordError as exc:
        return _reject(folder, arrival_ms, message_id, body, str(exc))
    except ValueError as exc:  # allow_nan=False on a summary holding NaN/Infinity
        return _reject(folder, arrival_ms, message_id, body, f"body: {exc}")
    return Reading(folder, arrival_ms, line)


def normalise_reading(obj: dict[str, Any], model: str, schema: FeatureSchema, thing: str,
                      received_at_ms: int) -> str:
    """The raw/ line for a reading, or RecordError naming the first bad field."""
    for required in ("id", "ts", "features"):
        if required not in obj:
            raise RecordError(f"{required}: missing")
    record_id = obj["id"]
    if not isinstance(record_id, str) or not record_id or len(record_id) > MAX_ID_CHARS:
        raise RecordError(f"id: must be a non-empty string of at most {MAX_ID_CHARS} "
                          f"characters, got {_show(record_id)}")
    ts = obj["ts"]
    if not _finite(ts):
        raise RecordError(f"ts: must be epoch seconds (a finite number), got {_show(ts)}")
    features = _features(obj["features"], schema)
    out: dict[str, Any] = {"id": record_id, "thing": thing, "model": model, "ts": ts,
                           "received_at": received_at_ms, "features": features}
    label = _label(obj.get("label"), schema, model, present="label" in obj)
    if label is not None:
        out["label"] = label
    # Why the device sent it decides the record's training weight: unlike the
    # diagnostics below, a malformed value is a rejection, never silently dropped.
    try:
        uplink = check_uplink_fields(obj)
    except UplinkFieldError as exc:
        raise RecordError(str(exc)) from None
    if uplink is not None:
        out[REASON_FIELD], out[INCLUSION_FIELD] = uplink
    # Device-side diagnostics are kept when well-typed and dropped otherwise: a NaN
    # score from a misbehaving model must not cost us the reading itself.
    version = obj.get("model_version")
    if type(version) is int and 0 <= version <= INT64_MAX:
        out["model_version"] = version
    score = obj.get("score")
    if _finite(score):
        out["score"] = score
    anomaly = obj.get("anomaly")
    if type(anomaly) is bool:
        out["anomaly"] = anomaly
    return _ENCODE(out)


def _features(raw: Any, schema: FeatureSchema) -> list[float]:
    if type(raw) is not list:
        raise RecordError(f"features: must be a list of {schema.feature_count} numbers, "
                          f"got {_json_type(raw)}")
    if len(raw) != schema.feature_count:
        raise RecordError(f"features: expected {schema.feature_count} values, got {len(raw)}")
    # Fast path in C (map/set/sum/min/max); the slow loops below only name the culprit.
    if not set(map(type, raw)) <= _NUMBER_TYPES:
        for i, v in enumerate(raw):
            if type(v) not in _NUMBER_TYPES:
                raise RecordError(f"features[{i}] ({schema.features[i]}): must be a number, "
                                  f"got {_show(v)}")
    try:
        values = list(map(float, raw))
    except OverflowError:
        i = next(i for i, v in enumerate(raw) if abs(v) > 1.7976931348623157e308)
        raise RecordError(f"features[{i}] ({schema.features[i]}): {_show(raw[i])} does not "
                          "fit a float") from None
    if not math.isfinite(sum(values)):
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise RecordError(f"features[{i}] ({schema.features[i]}): must be finite, "
                                  f"got {v}")
        # all finite, the sum merely overflowed: the bounds check below decides
    if min(values) < schema.min_value or max(values) > schema.max_value:
        for i, v in enumerate(values):
            if not schema.min_value <= v <= schema.max_value:
                raise RecordError(f"features[{i}] ({schema.features[i]}): {v:g} is outside "
                                  f"[{schema.min_value:g}, {schema.max_value:g}]")
    return values


def _label(raw: Any, schema: FeatureSchema, model: str, *, present: bool) -> int | None:
    if raw is None:
        if schema.label == "required":
            what = "null" if present else "missing"
            raise RecordError(f"label: required by model '{model}' but {what}")
        return None
    if schema.label == "none":
        raise RecordError(f"label: model '{model}' takes no label (schema label = 'none'), "
                          f"got {_show(raw)}")
    if type(raw) is not int or not INT64_MIN <= raw <= INT64_MAX:
        raise RecordError(f"label: must be a whole number in the int64 range, got {_show(raw)}")
    if schema.label_values is not None and raw not in schema.label_values:
        allowed = ", ".join(map(str, schema.label_values))
        raise RecordError(f"label: {raw} is not one of the model's label_values ({allowed})")
    return raw


def _received_at(obj: dict[str, Any], fallback_ms: int, now_ms: int) -> int:
    value = obj.get("received_at")
    if value is None:
        return fallback_ms
    if not _finite(value) or value < 0:
        raise RecordError(f"received_at: must be epoch milliseconds (the IoT rule's "
                          f"timestamp()), got {_show(value)}")
    latest = min(max(now_ms, fallback_ms) + MAX_RECEIVED_AT_SKEW_MS, MAX_ARRIVAL_MS)
    if value > latest:
        raise RecordError(f"received_at: {_show(value)} is more than 24 h in the future (now "
                          f"{now_ms}); it cannot be the IoT rule's arrival time")
    return int(value)


def _finite(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite and fits a float (huge integers do not)."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -MAX_FLOAT <= value <= MAX_FLOAT


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: no recursion to overflow)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _check_unicode(obj: Any) -> None:
    """JSON `\\ud800`-style escapes decode to lone surrogates that no UTF-8 writer accepts."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=True)
    except RecursionError:
        raise RecordError("body: JSON nested too deeply to check") from None
    if _REPLACEMENT_CHAR in text:
        raise RecordError("body: contains an escaped U+FFFD replacement character (bytes "
                          "that were not UTF-8 were replaced upstream)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(f"body: a JSON string escape decodes to a lone surrogate "
                          f"U+{ord(text[exc.start]):04X}, which is not valid Unicode") from None


def _claimed_model(body: str, config: PipelineConfig) -> str:
    """The quarantine folder for a body rejected before parsing: its model if it names one."""
    try:
        name = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return UNKNOWN_MODEL
    return name if isinstance(name, str) and name in config.models else UNKNOWN_MODEL


def _escapable(body: str) -> bool:
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in body if 0xD800 <= ord(c) <= 0xDFFF)


def _reject(model: str, arrival_ms: int, message_id: str, body: str | bytes, reason: str,
            *, binary: bool = False) -> Rejection:
    """The quarantine line: reason, message id and the original body (or enough to find it)."""
    original = body.encode("utf-8") if isinstance(body, str) else body
    truncated = len(original) > MAX_PAYLOAD_BYTES
    if binary:
        body, encoding = base64.b64encode(original[:MAX_PAYLOAD_BYTES]).decode("ascii"), "base64"
    else:
        text = original.decode("utf-8")
        body, encoding = (text[:QUARANTINE_BODY_CHARS] if truncated else text), "utf-8"
    line = {
        "reason": reason,
        "message_id": message_id,
        "model": model,
        "received_at": arrival_ms,
        "body": body,
        "body_encoding": encoding,
        "body_bytes": len(original),
        "body_sha256": hashlib.sha256(original).hexdigest(),
        "body_truncated": truncated,
    }
    return Rejection(model, arrival_ms, reason, _ENCODE(line))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (booleans are not numbers)"
    if isinstance(value, dict | list):
        return _json_type(value)
    return shown(value)
