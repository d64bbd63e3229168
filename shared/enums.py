"""The base of steprun's string enums: each member *is* its string, in comparisons, text and JSON."""
from __future__ import annotations

from enum import Enum


class StrValueEnum(str, Enum):
    """A str Enum that compares equal to its value and formats as it (``str()``, f-strings, ``%s``), not as
    ``Class.MEMBER``: what :class:`enum.StrEnum` does from Python 3.11, for Python 3.10 too."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)
