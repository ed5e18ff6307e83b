"""Showing values that came from outside in reasons and logs, without raising.

`repr()` itself can fail on outside input: a JSON value nested near Python's recursion
limit raises RecursionError and an integer past 4,300 digits raises ValueError. Every
reason that quotes an outside value goes through `shown`.
"""

from __future__ import annotations

from typing import Any


def safe_repr(value: Any) -> str:
    """repr(value), or a placeholder naming its type when repr() cannot produce it."""
    try:
        return repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__} too deep or too long to show>"


def shown(value: Any, limit: int = 80) -> str:
    """safe_repr cut to `limit` characters (an ellipsis marks the cut)."""
    text = safe_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
