"""Hypothesis strategies for input that comes from outside: the worst of JSON.

Deep nesting, numbers that do not fit a float or DynamoDB (huge, tiny, 4,000-digit
integers), control, format, private-use and non-BMP characters and lone surrogates.
Shared by the property tests of every part (tests/*/test_fuzz_*.py).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

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
