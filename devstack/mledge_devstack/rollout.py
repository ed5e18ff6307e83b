"""A job's rollout rate, as AWS IoT Jobs applies `jobExecutionsRolloutConfig`.

AWS notifies at most `maximumPerMinute` things of a job per minute (1000 when
not set). With `exponentialRate` the rate starts at `baseRatePerMinute` and is
multiplied by `incrementFactor` each time another `numberOfNotifiedThings`
things have been notified (or another `numberOfSucceededThings` have
succeeded), never above `maximumPerMinute`. A thing the rollout has not reached
yet has no job execution at all.

`RolloutGate` holds the things not reached yet, in the order the targets named
them, and hands out as many as the rate allows within a sliding minute.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAXIMUM_PER_MINUTE = 1000
WINDOW_SECONDS = 60.0


class RolloutConfigError(ValueError):
    """A rollout config AWS would refuse at CreateJob."""


@dataclass
class RolloutGate:
    maximum_per_minute: int = DEFAULT_MAXIMUM_PER_MINUTE
    base_per_minute: int | None = None  # set: exponential rate
    increment_factor: float = 1.0
    every_notified: int | None = None
    every_succeeded: int | None = None
    waiting_things: deque[tuple[str, str]] = field(default_factory=deque)
    released_at: deque[float] = field(default_factory=deque)
    notified: int = 0
    stopped: bool = False
    known: set[str] = field(default_factory=set)  # every thing ever added (CONTINUOUS re-adds)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, now: float = 0.0) -> RolloutGate:
        config = config or {}
        maximum = int(config.get("maximumPerMinute") or DEFAULT_MAXIMUM_PER_MINUTE)
        if maximum < 1:
            raise RolloutConfigError(f"maximumPerMinute must be at least 1, got {maximum}")
        exponential = config.get("exponentialRate")
        if not exponential:
            return cls(maximum_per_minute=maximum)
        criteria = exponential.get("rateIncreaseCriteria") or {}
        notified = criteria.get("numberOfNotifiedThings")
        succeeded = criteria.get("numberOfSucceededThings")
        if (notified is None) == (succeeded is None):
            raise RolloutConfigError(
                "rateIncreaseCriteria needs exactly one of numberOfNotifiedThings and "
                "numberOfSucceededThings")
        return cls(
            maximum_per_minute=maximum,
            base_per_minute=int(exponential["baseRatePerMinute"]),
            increment_factor=float(exponential["incrementFactor"]),
            every_notified=int(notified) if notified is not None else None,
            every_succeeded=int(succeeded) if succeeded is not None else None,
        )

    @property
    def waiting(self) -> int:
        return len(self.waiting_things)

    def add(self, thing: str, arn: str) -> None:
        """Queue a thing once; adding it again (a CONTINUOUS job's next sync) does nothing."""
        if not self.stopped and thing not in self.known:
            self.known.add(thing)
            self.waiting_things.append((thing, arn))

    def stop(self) -> None:
        """The job was canceled or aborted: nobody else is reached."""
        self.stopped = True
        self.waiting_things.clear()

    def rate(self, succeeded: int) -> int:
        """Things per minute now, given how many were notified and have succeeded."""
        if self.base_per_minute is None:
            return self.maximum_per_minute
        if self.every_notified is not None:
            steps = self.notified // self.every_notified
        else:
            steps = succeeded // max(1, self.every_succeeded or 1)
        # Bounded exponent: the rate is capped anyway, and 5**big overflows floats.
        steps = min(steps, 64)
        rate = self.base_per_minute * self.increment_factor ** steps
        return max(1, min(self.maximum_per_minute, math.floor(rate)))

    def release(self, now: float, succeeded: int = 0) -> list[tuple[str, str]]:
        """The (thing, arn) pairs to notify now; at most rate() in any 60 s window."""
        while self.released_at and self.released_at[0] <= now - WINDOW_SECONDS:
            self.released_at.popleft()
        out: list[tuple[str, str]] = []
        while self.waiting_things and not self.stopped:
            # The rate can rise within one call (numberOfNotifiedThings reached).
            if len(self.released_at) >= self.rate(succeeded):
                break
            out.append(self.waiting_things.popleft())
            self.released_at.append(now)
            self.notified += 1
        return out
