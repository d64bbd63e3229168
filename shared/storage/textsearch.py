"""Turning a person's or a model's query into a full-text query, for each database.

Queries from agents are natural-language questions ("what is my favourite
colour?"), so the default is *any* term, ranked: a document that shares more
(and rarer) words ranks higher. ``match="all"`` hands the query to Postgres'
websearch_to_tsquery as written (quotes, ``-word`` and ``or`` work there).
The dialect is decided per call from the session's bind, never configured.
"""
from __future__ import annotations

import re
from typing import Literal

from sqlalchemy import ColumnElement, SQLColumnExpression, case, func, literal
from sqlalchemy.orm import Session

Match = Literal["any", "all"]
MAX_TERMS = 32

# Small on purpose: Postgres' English configuration drops stop words itself;
# this list only keeps SQLite's OR queries from matching every "the" and "is".
STOP_WORDS = frozenset(
    "a an and are as at be by do does did for from has have how i in is it its me my of on or our so "
    "that the their them there these this to was we were what when where which who why will with you your".split()
)


def dialect(db: Session) -> str:
    """The database dialect ("postgresql", "sqlite") of the session's connection."""
    bind = db.get_bind()
    return bind.dialect.name


def terms(query: str) -> list[str]:
    """The distinct lower-cased words of a query, stop words removed (all of them kept if all are stop words)."""
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"\w+", query)))
    kept = [w for w in words if w not in STOP_WORDS]
    return (kept or words)[:MAX_TERMS]


def postgres_query(query: str, match: Match) -> str:
    """Text for websearch_to_tsquery: the query itself, or its words joined by ``or``."""
    if match == "all":
        return query.replace("\x00", " ")  # the one character Postgres text cannot carry
    # Only \\w characters survive terms(), so nothing here can be read as syntax.
    return " or ".join(terms(query))


def fts5_query(query: str, match: Match) -> str:
    """An FTS5 MATCH expression: each word quoted (no syntax can leak in), joined by OR or AND."""
    joiner = " AND " if match == "all" else " OR "
    return joiner.join(f'"{t}"' for t in terms(query))


def term_count(column: SQLColumnExpression[str], query: str) -> ColumnElement[int]:
    """How many of the query's words occur in ``column``: the fallback score where no index exists."""
    lowered = func.lower(column)
    score: ColumnElement[int] = literal(0)
    for word in terms(query):
        score = score + case((lowered.contains(word, autoescape=True), 1), else_=0)
    return score
