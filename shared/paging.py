"""List paging: one page of rows, and the cursor of the next one."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


def page(rows: Iterable[Row], limit: int, cursor: Callable[[Row], Cursor]) -> tuple[list[Row], Cursor | None]:
    """The first ``limit`` of ``rows``, and the ``next`` cursor: None on the last page.

    Fetch ``limit + 1`` rows: the extra one only tells that another page
    follows. The cursor is ``cursor(last row of this page)``, e.g. its id for
    keyset paging (the next page starts after it).
    """
    fetched = list(rows)
    return fetched[:limit], (cursor(fetched[limit - 1]) if len(fetched) > limit else None)
