"""When a schedule runs next: 5-field cron read in an IANA time zone (croniter handles DST), or every N seconds."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from shared.clock import aware
from shared.errors import BadInput


def check_timezone(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise BadInput("'timezone' must be an IANA time zone name such as Europe/Paris", field="timezone")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(f"unknown time zone {name!r}; use an IANA name such as Europe/Paris", field="timezone") from None
    return name


def check_cron(expr: Any) -> str:
    if not isinstance(expr, str) or len(expr) > 200:
        raise BadInput("'cron' must be a string of 5 fields: minute hour day-of-month month day-of-week", field="cron")
    fields = expr.split()
    if len(fields) != 5 or not croniter.is_valid(" ".join(fields)):
        raise BadInput(f"'cron' {expr!r} is not a 5-field cron expression (minute hour day-of-month month "
                       "day-of-week), e.g. '0 9 * * 1-5'", field="cron")
    return " ".join(fields)


def check_every(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 366 * 86400:
        raise BadInput(f"'every_seconds' must be a whole number of seconds from {minimum} "
                       "(STEPRUN_SCHEDULE_MIN_SECONDS) to a year", field="every_seconds")
    return value


def next_run(cron: str | None, every_seconds: int | None, tz: str, now: datetime,
             previous: datetime | None = None) -> datetime:
    """The first run time strictly after ``now`` (UTC).

    Runs missed while no scheduler ran collapse into the one fired on return:
    the next is computed from ``now``, not one period after the missed slot. An
    interval served on time keeps its phase (``previous`` plus one period).
    """
    now = aware(now)
    if cron is not None:
        local = now.astimezone(ZoneInfo(tz))
        return croniter(cron, local).get_next(datetime).astimezone(timezone.utc)
    if every_seconds is None:
        raise ValueError("a schedule has a cron expression or an interval")
    step = timedelta(seconds=every_seconds)
    if previous is not None and aware(previous) + step > now:
        return aware(previous) + step
    return now + step
