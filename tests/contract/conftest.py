"""The contract suite: each embedded-mode twin against its production counterpart, on the same tests.

A Redis implementation runs on the machine's real Redis under a key prefix (or
queue name) of its own per test, deleted afterwards; its in-memory twin gets a
fresh instance per test.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.processes import REDIS_URL, RUN_ID


@pytest.fixture
def redis_client() -> Iterator[Any]:
    """A client as the runtime makes one: bytes in, bytes out (no decoding)."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def unique_name(redis_client: Any) -> Iterator[str]:
    """A Redis key prefix (or queue name) no other test uses; every key under it is deleted at the end."""
    name = f"steprun-contract-{RUN_ID}-{secrets.token_hex(4)}"
    yield name
    keys = list(redis_client.scan_iter(match=f"*{name}*", count=1000))
    if keys:
        redis_client.delete(*keys)
