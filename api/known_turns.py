"""Turns this web process created or read: whose they are and their session, which never change.

A long-poll (``GET /v1/turns/{id}?wait=``) of a turn found here subscribes to its
session's doorbell at once and reads the turn once, at the end: no read (one
Postgres transaction) before the wait just to learn the session. Only the owner is
answered from here (anyone else is read, and gets the 404 the read gives); a turn
deleted since (a rollback, its session deleted) is found out by that final read.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from shared.auth.principal import Principal

# Enough for every turn a process's clients poll at once; the oldest are forgotten first.
MAX_KNOWN = 10_000


class KnownTurns:
    def __init__(self, size: int = MAX_KNOWN):
        self._size = size
        self._rows: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, turn_id: str, tenant_id: str, user_id: str, session_id: str) -> None:
        with self._lock:
            self._rows[turn_id] = (tenant_id, user_id, session_id)
            self._rows.move_to_end(turn_id)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)

    def session_of(self, turn_id: str, who: Principal) -> str | None:
        """The session of ``who``'s turn ``turn_id``, or None (not known here, or not ``who``'s)."""
        with self._lock:
            row = self._rows.get(turn_id)
        if row is None or row[0] != who.tenant_id or row[1] != who.user_id:
            return None
        return row[2]
