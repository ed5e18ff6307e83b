"""When a model's `training.schedule` asks for a training: EventBridge's `rate(...)` and
`cron(...)` expressions evaluated at each tick of the schedule handler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

# The schedule handler runs this often (app.py uses the same constant); a
# model's `training.schedule` is honoured to within one tick.
SCHEDULE_TICK_MINUTES = 15


class ScheduleError(Exception):
    """A `training.schedule` expression this evaluator cannot evaluate."""


_RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_MONTHS = {m: i + 1 for i, m in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])}
_WEEKDAYS = {d: i + 1 for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}


def _cron_field_matches(spec: str, value: int, low: int, high: int,
                        names: Mapping[str, int] | None = None) -> bool:
    if spec in ("*", "?"):
        return True
    for part in spec.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
        if part == "*":
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            start, end = _cron_value(a, names), _cron_value(b, names)
        else:
            start = _cron_value(part, names)
            end = high if step > 1 or "/" in spec else start
        if start <= value <= end and (value - start) % step == 0:
            return True
    return False


def _cron_value(text: str, names: Mapping[str, int] | None) -> int:
    if names and text.upper() in names:
        return names[text.upper()]
    if not text.isdigit():
        raise ScheduleError(f"unsupported cron value {text!r} (L, W and # are not supported)")
    return int(text)


def cron_matches(expression: str, when: datetime) -> bool:
    """Whether EventBridge's `cron(min hour day-of-month month day-of-week year)` fires at `when` (UTC)."""
    fields = expression[len("cron("):-1].split()
    if len(fields) != 6:
        raise ScheduleError(f"{expression}: cron needs 6 fields")
    minute, hour, dom, month, dow, year = fields
    aws_weekday = (when.isoweekday() % 7) + 1  # SUN=1 .. SAT=7
    return (_cron_field_matches(minute, when.minute, 0, 59)
            and _cron_field_matches(hour, when.hour, 0, 23)
            and _cron_field_matches(dom, when.day, 1, 31)
            and _cron_field_matches(month, when.month, 1, 12, _MONTHS)
            and _cron_field_matches(dow, aws_weekday, 1, 7, _WEEKDAYS)
            and _cron_field_matches(year, when.year, 1970, 2199))


def schedule_due(expression: str, now: float, last_started: float | None,
                 tick_minutes: int = SCHEDULE_TICK_MINUTES) -> bool:
    """Whether a model's `training.schedule` asks for a training at this tick.

    `rate(N unit)`: N units (less half a tick, for tick jitter) since the last
    training started, or never trained. `cron(...)`: a minute in the last tick
    matches, and no training started within that tick.
    """
    tick = tick_minutes * 60
    rate = _RATE.match(expression)
    if rate:
        period = int(rate[1]) * _UNIT_SECONDS[rate[2].rstrip("s")]
        return last_started is None or now - last_started >= period - tick / 2
    if expression.startswith("cron(") and expression.endswith(")"):
        if last_started is not None and now - last_started < tick:
            return False
        end = datetime.fromtimestamp(now, UTC).replace(second=0, microsecond=0)
        return any(cron_matches(expression, end - timedelta(minutes=m))
                   for m in range(tick_minutes))
    raise ScheduleError(f"unsupported schedule expression {expression!r}")
