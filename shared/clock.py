"""Wall-clock time as steprun stores it: always timezone-aware UTC."""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything steprun stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
