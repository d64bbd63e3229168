"""Turns that start themselves: schedules (cron or every N seconds) and delayed turns (DESIGN section 11.1).

- :mod:`~shared.schedules.timing` — reading cron expressions in IANA time zones (croniter) and the next run;
- :mod:`~shared.schedules.service` — a principal's schedules: create, read, change, delete, list runs;
- :mod:`~shared.schedules.firing` — the scheduler's job: fire due schedules and delayed turns, each exactly once.
"""
