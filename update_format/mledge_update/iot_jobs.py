"""What AWS IoT Jobs accepts in a device's requests, defined once for the agent and the bridge.

From the IoT Jobs API reference (UpdateJobExecution, JobExecutionState):

- `statusDetails`: a map of at most 10 entries; keys 1-128 characters of
  `[a-zA-Z0-9:_-]`; values 1-1,024 characters matching `[^\\p{C}]+`: no control,
  format, surrogate, private-use or unassigned characters, so no newline. AWS is
  a Java service, so a "character" is a UTF-16 code unit: a character outside the
  BMP (an emoji) counts twice. Anything else is answered with `InvalidRequest`.
- `expectedVersion`, `executionNumber`: integers (Java `Long`).
- `stepTimeoutInMinutes`: an integer, 1 to 10,080 (7 days), or -1 to cancel the
  step timer.
- thing names: 1-128 of `[a-zA-Z0-9:_-]`; job ids: 1-64 of `[a-zA-Z0-9_-]`.

The agent builds every statusDetails map with `status_details`, which always meets
these rules; the local bridge refuses what AWS refuses with the same checks.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

MAX_STATUS_DETAILS = 10
MAX_DETAIL_KEY_CHARS = 128
MAX_DETAIL_VALUE_CHARS = 1024
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
STEP_TIMEOUT_MINUTES = (1, 10_080)
CANCEL_STEP_TIMEOUT = -1

# fullmatch only: `$` would also match before a trailing newline.
DETAIL_KEY = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")

_WHITESPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")


class InvalidJobsRequestError(ValueError):
    """A request AWS IoT Jobs would answer with `InvalidRequest`; the message says why."""


def utf16_length(text: str) -> int:
    """Length as Java (and so AWS) counts it: characters outside the BMP count twice."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _is_other(char: str) -> bool:
    """Whether `char` is in Unicode's general category C (what `\\p{C}` matches)."""
    return unicodedata.category(char).startswith("C")


def check_status_details(details: Any) -> dict[str, str]:
    """`details` as AWS accepts it, or InvalidJobsRequestError naming the first problem."""
    if not isinstance(details, Mapping):
        raise InvalidJobsRequestError(
            f"statusDetails must be an object, got {type(details).__name__}")
    if len(details) > MAX_STATUS_DETAILS:
        raise InvalidJobsRequestError(
            f"statusDetails has {len(details)} entries; at most {MAX_STATUS_DETAILS}")
    for key, value in details.items():
        if not isinstance(key, str) or not DETAIL_KEY.fullmatch(key):
            raise InvalidJobsRequestError(
                f"statusDetails key {_short(key)} must be 1-{MAX_DETAIL_KEY_CHARS} characters "
                "of [a-zA-Z0-9:_-]")
        if not isinstance(value, str):
            raise InvalidJobsRequestError(
                f"statusDetails.{key} must be a string, got {type(value).__name__}")
        if not value:
            raise InvalidJobsRequestError(f"statusDetails.{key} must not be empty")
        if utf16_length(value) > MAX_DETAIL_VALUE_CHARS:
            raise InvalidJobsRequestError(
                f"statusDetails.{key} is {utf16_length(value)} characters; at most "
                f"{MAX_DETAIL_VALUE_CHARS}")
        bad = next((c for c in value if _is_other(c)), None)
        if bad is not None:
            raise InvalidJobsRequestError(
                f"statusDetails.{key} contains U+{ord(bad):04X} ({unicodedata.category(bad)}); "
                "values must match [^\\p{C}]+")
    return dict(details)


def check_long(value: Any, name: str) -> int:
    """An optional request field of type Long: an integer (not a boolean) in range."""
    if type(value) is not int or not LONG_MIN <= value <= LONG_MAX:
        raise InvalidJobsRequestError(f"{name} must be an integer, got {_short(value)}")
    return value


def check_step_timeout(value: Any) -> int:
    """stepTimeoutInMinutes: 1 to 10,080, or -1 (cancel the step timer)."""
    low, high = STEP_TIMEOUT_MINUTES
    if type(value) is not int or not (value == CANCEL_STEP_TIMEOUT or low <= value <= high):
        raise InvalidJobsRequestError(
            f"stepTimeoutInMinutes must be -1 or {low} to {high}, got {_short(value)}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidJobsRequestError(f"{name} must be true or false, got {_short(value)}")
    return value


def sanitize_detail_value(value: Any) -> str:
    """Any value as a statusDetails value AWS accepts ("" when nothing printable is left).

    Line breaks and tabs become spaces (runs collapse), other category-C characters
    (controls, format characters, lone surrogates, private use, unassigned) become
    `\\uXXXX` text, and the result is cut to 1,024 UTF-16 units without splitting a
    character.
    """
    text = value if isinstance(value, str) else _safe_str(value)
    out: list[str] = []
    used = 0
    for char in text:
        if char in _WHITESPACE_CONTROLS:
            piece = "" if out and out[-1] == " " else " "
        elif _is_other(char):
            piece = _escape(char)
        else:
            piece = char
        cost = utf16_length(piece)
        if used + cost > MAX_DETAIL_VALUE_CHARS:
            break
        out.append(piece)
        used += cost
    return "".join(out).strip()


def status_details(**values: Any) -> dict[str, str]:
    """A statusDetails map that meets AWS's rules; None and empty values are left out.

    Keys are the caller's (checked: a bad key is a programming error, ValueError);
    values are sanitized with `sanitize_detail_value`.
    """
    details: dict[str, str] = {}
    for key, value in values.items():
        if not DETAIL_KEY.fullmatch(key):
            raise ValueError(f"statusDetails key {key!r} does not match [a-zA-Z0-9:_-]{{1,128}}")
        if value is None:
            continue
        text = sanitize_detail_value(value)
        if text:
            details[key] = text
    if len(details) > MAX_STATUS_DETAILS:
        raise ValueError(f"statusDetails allows {MAX_STATUS_DETAILS} keys, got {sorted(details)}")
    return details


def ascii_details(details: Mapping[str, str]) -> dict[str, str]:
    """The most conservative form of a statusDetails map: printable ASCII only.

    Used for the retry after AWS refused a map anyway (its Unicode tables may be
    older or newer than Python's): every other character becomes `\\uXXXX` text.
    """
    out: dict[str, str] = {}
    for key, value in details.items():
        if not isinstance(key, str) or not DETAIL_KEY.fullmatch(key):
            continue
        text = "".join(c if " " <= c <= "~" else _escape(c) for c in _safe_str(value))
        text = text[:MAX_DETAIL_VALUE_CHARS].strip()
        if text:
            out[key] = text
        if len(out) == MAX_STATUS_DETAILS:
            break
    return out


def _escape(char: str) -> str:
    return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"


def _safe_str(value: Any) -> str:
    try:
        return value if isinstance(value, str) else str(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text[:80]
