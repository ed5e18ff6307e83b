"""Hypothesis strategies for input that comes from outside: the worst of JSON.

Deep nesting, numbers that do not fit a float or DynamoDB (huge, tiny, 4,000-digit
integers), control, format, private-use and non-BMP characters, lone surrogates,
and the wrong type at every field of an otherwise valid record.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from tests.ingest_helpers import DIGITS, VIBRATION, reading

# Numbers no test had: each once made some parser raise something it did not document.
EDGE_NUMBERS: tuple[Any, ...] = (
    0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**38, 10**45, 10**309,
    -(10**309), 10**400, 10**4000, 1e200, -1e200, 1e-200, 1e-130, 5e-324, 1e308, 1.7976931348623157e308,
    float("inf"), float("-inf"), float("nan"), -0.0, True, False,
)
EDGE_TEXT: tuple[str, ...] = (
    "", " ", "\n", "x\n", "\r\n", "\x00", "\x7f", "\x85", "\u200b", "\u2028", "\ufeff", "\ufffd",
    "\ue000", "\U0010ffff", "\U0001f600" * 3, "\ud800", "\udcff", "a\udc80b", "NaN", "Infinity",
    "[" * 2000, "{" * 2000, '{"a":' * 1500, "null", "true", "-0", "1e999", "9" * 5000,
)


def nasty_numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(EDGE_NUMBERS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-400, max_value=400).map(lambda e: 10**e if e >= 0 else 10.0**e),
    )


def nasty_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Text with every category of character, lone surrogates included, and known bad strings."""
    chars = st.one_of(
        st.characters(codec=None),  # all of Unicode except surrogates
        st.sampled_from(["\n", "\r", "\t", "\x00", "\x1b", "\u200e", "\ue000", "\U0001f4a5",
                         "\ud800", "\udfff", "\udc80", "\ufffd", '"', "\\", "/"]),
    )
    return st.one_of(st.sampled_from(EDGE_TEXT), st.text(chars, max_size=max_size))


def _deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON-like value (as Python) with nasty leaves, plus nesting up to 200 deep."""
    leaves = st.one_of(st.none(), st.booleans(), nasty_numbers(), nasty_text())
    tree = st.recursive(
        leaves,
        lambda children: st.one_of(st.lists(children, max_size=4),
                                   st.dictionaries(nasty_text(12), children, max_size=4)),
        max_leaves=max_leaves,
    )
    return st.one_of(tree, st.builds(_deep, st.integers(1, 200), leaves))


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
