"""Fakes more than one part's tests use (one of each kind)."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: seconds since the epoch, advanced with `now +=`."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
