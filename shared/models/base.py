"""The declarative base, column types and ids that every model shares."""
from __future__ import annotations

import secrets
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, Integer, MetaData, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase

# JSONB on Postgres, plain JSON (text) on SQLite in the embedded mode.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id(prefix: str) -> str:
    """An unguessable id: the prefix names the kind, 96 random bits follow."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


def table_of(model: type[Base]) -> Table:
    """A model's table, for Core statements (typed as the Table it is; ``__table__`` is typed a FromClause)."""
    return cast(Table, model.__table__)
