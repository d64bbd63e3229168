"""Storage quotas and the tenant's queued-turn cap: a write past a quota is a 413 quota_exceeded and writes nothing."""
from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from api.app import create_app
from shared.auth.keys import create_key
from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.errors import QuotaExceeded
from shared.migrate import upgrade
from shared.models import AgentSession, KnowledgeDocument, MemoryItem, Turn
from shared.runtime import Runtime
from shared.storage.memory import MemoryStore
from shared.turns import service as turns

OFF = {"quota_user_documents": 0, "quota_tenant_documents": 0, "quota_user_document_bytes": 0,
       "quota_tenant_document_bytes": 0, "quota_user_memory_items": 0, "quota_tenant_memory_items": 0,
       "quota_user_history_bytes": 0, "quota_tenant_history_bytes": 0, "max_queued_turns_per_tenant": 0}


@pytest.fixture
def app_with(runtimes: Callable[..., Runtime]) -> Callable[..., tuple[Any, Runtime]]:
    def make(**limits: Any) -> tuple[Any, Runtime]:
        rt = runtimes(**{**OFF, **limits})
        return create_app(rt.settings, runtime=rt).test_client(), rt
    return make


def _keys(rt: Runtime, tenant: str, *users: str) -> list[str]:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return [create_key(db, tenant, user)[1] for user in users]


def _h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _count(rt: Runtime, model: Any, tenant: str) -> int:
    with unit_of_work(rt.sessions, SYSTEM) as db:
        return db.scalar(select(func.count()).select_from(model).where(model.tenant_id == tenant)) or 0


def _refused(r: Any, setting: str) -> None:
    assert r.status_code == 413, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "quota_exceeded" and setting in error["message"], error


def test_document_quotas_per_user_and_per_tenant(app_with: Any) -> None:
    c, rt = app_with(quota_user_documents=2, quota_user_document_bytes=3000, quota_tenant_documents=3)
    tenant = f"t-{secrets.token_hex(3)}"
    alice, bob, carol = _keys(rt, tenant, "alice", "bob", "carol")

    def upload(key: str, size: int) -> Any:
        return c.post("/v1/knowledge", json={"title": "t", "text": "é" * (size // 2)}, headers=_h(key))

    assert upload(alice, 1000).status_code == 201
    _refused(upload(alice, 2200), "STEPRUN_QUOTA_USER_DOCUMENT_BYTES=3000")  # bytes, not characters
    assert upload(alice, 1000).status_code == 201
    _refused(upload(alice, 10), "STEPRUN_QUOTA_USER_DOCUMENTS=2")
    assert upload(bob, 10).status_code == 201  # another user has their own quota ...
    _refused(upload(carol, 10), "STEPRUN_QUOTA_TENANT_DOCUMENTS=3")  # ... within the tenant's
    assert _count(rt, KnowledgeDocument, tenant) == 3  # nothing refused was written
    # Deleting frees room.
    doc = c.get("/v1/knowledge", headers=_h(alice)).get_json()["data"][0]["id"]
    assert c.delete(f"/v1/knowledge/{doc}", headers=_h(alice)).status_code == 200
    assert upload(carol, 10).status_code == 201


def test_memory_item_quota_counts_new_items_and_lets_replacements_through(app_with: Any) -> None:
    c, rt = app_with(quota_user_memory_items=2, quota_tenant_memory_items=3)
    tenant = f"t-{secrets.token_hex(3)}"
    alice, bob = _keys(rt, tenant, "alice", "bob")
    assert c.put("/v1/memory/notes/a", json={"value": 1}, headers=_h(alice)).status_code == 201
    assert c.put("/v1/memory/notes/b", json={"value": 2}, headers=_h(alice)).status_code == 201
    _refused(c.put("/v1/memory/notes/c", json={"value": 3}, headers=_h(alice)), "STEPRUN_QUOTA_USER_MEMORY_ITEMS=2")
    assert c.put("/v1/memory/notes/a", json={"value": 9}, headers=_h(alice)).status_code == 200  # a replacement
    assert c.put("/v1/memory/notes/a", json={"value": 1}, headers=_h(bob)).status_code == 201
    _refused(c.put("/v1/memory/notes/b", json={"value": 1}, headers=_h(bob)), "STEPRUN_QUOTA_TENANT_MEMORY_ITEMS=3")
    assert _count(rt, MemoryItem, tenant) == 3


def test_a_tool_writing_memory_past_the_quota_gets_an_error_not_a_crash(app_with: Any) -> None:
    _, rt = app_with(quota_user_memory_items=1)
    who = Principal(f"t-{secrets.token_hex(3)}", "u")
    store = MemoryStore(rt.sessions, rt.settings, who)
    store.put("facts", "one", {"text": "a"})
    with pytest.raises(QuotaExceeded, match="STEPRUN_QUOTA_USER_MEMORY_ITEMS=1"):
        store.put("facts", "two", {"text": "b"})
    store.put("facts", "one", {"text": "replaced"})
    assert store.get("facts", "one") == {"text": "replaced"} and store.get("facts", "two") is None


def _all_at_once(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run each job on a thread of its own, all released together; their results, sorted."""
    import threading

    start = threading.Barrier(len(jobs))
    results: list[Any] = []

    def run(job: Callable[[], Any]) -> None:
        start.wait()
        results.append(job())

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(results)


def _new_memory_items_at_once(rt: Runtime, who: Principal, n: int) -> list[str]:
    """``n`` tools writing a new item each, at once: "written" or "refused" for each."""
    def write(i: int) -> Callable[[], str]:
        store = MemoryStore(rt.sessions, rt.settings, who)

        def put() -> str:
            try:
                store.put("facts", f"item-{i}", {"text": str(i)})
                return "written"
            except QuotaExceeded:
                return "refused"
        return put

    return _all_at_once([write(i) for i in range(n)])


def test_tools_writing_memory_at_once_do_not_pass_the_quota_together(app_with: Any) -> None:
    """Eight writers of new items at once against a quota of one: one item is written, seven are refused (the
    count and the write were two transactions, and writers counting before either wrote all got through)."""
    _, rt = app_with(quota_user_memory_items=1)
    who = Principal(f"t-{secrets.token_hex(3)}", "u")
    assert _new_memory_items_at_once(rt, who, 8) == ["refused"] * 7 + ["written"]
    assert _count(rt, MemoryItem, who.tenant_id) == 1


def test_tools_writing_memory_at_once_on_the_embedded_database_do_not_pass_the_quota_together(
        runtimes: Callable[..., Runtime], tmp_path: Any) -> None:
    """The same on SQLite (the embedded default), which has no advisory locks: a process lock held until the
    writing transaction ends."""
    rt = runtimes(**{**OFF, "quota_user_memory_items": 1}, database_url=None, redis_url=None,
                  data_dir=str(tmp_path))
    assert rt.engine.dialect.name == "sqlite"
    upgrade(rt.engine)
    who = Principal("t-embedded", "u")
    assert _new_memory_items_at_once(rt, who, 8) == ["refused"] * 7 + ["written"]
    assert _count(rt, MemoryItem, who.tenant_id) == 1


def test_uploads_at_once_do_not_pass_the_document_quotas_together(app_with: Any) -> None:
    """Eight uploads at once of one user against a quota of two documents, and of a tenant's users against its
    bytes: each quota holds exactly (the count ran before the insert, in its own transaction)."""
    c, rt = app_with(quota_user_documents=2, quota_tenant_document_bytes=3000)
    tenant = f"t-{secrets.token_hex(3)}"
    keys = _keys(rt, tenant, "alice", "bob", "carol", "dan")

    def race(uploads: list[tuple[str, int]]) -> list[int]:
        def upload(key: str, size: int) -> Callable[[], int]:
            client = c.application.test_client()
            return lambda: client.post("/v1/knowledge", json={"title": "t", "text": "x" * size},
                                       headers=_h(key)).status_code
        return _all_at_once([upload(key, size) for key, size in uploads])

    assert race([(keys[0], 10)] * 8) == [201] * 2 + [413] * 6
    assert _count(rt, KnowledgeDocument, tenant) == 2
    # 20 bytes used; room for 2980 more: two of these eight 1000-byte uploads by three users fit, not three.
    assert race([(keys[1 + i % 3], 1000) for i in range(8)]) == [201] * 2 + [413] * 6
    assert _count(rt, KnowledgeDocument, tenant) == 4


def test_the_history_quota_counts_kept_turn_input_and_frees_with_the_session(app_with: Any) -> None:
    c, rt = app_with(quota_user_history_bytes=5000)
    tenant = f"t-{secrets.token_hex(3)}"
    (alice,) = _keys(rt, tenant, "alice")
    sid = c.post("/v1/sessions", json={"agent": "echo"}, headers=_h(alice)).get_json()["id"]
    assert c.post(f"/v1/sessions/{sid}/turns", json={"input": "x" * 3000}, headers=_h(alice)).status_code == 202
    r = c.post(f"/v1/sessions/{sid}/turns", json={"input": "é" * 1001}, headers=_h(alice))  # 2002 bytes
    _refused(r, "STEPRUN_QUOTA_USER_HISTORY_BYTES=5000")
    assert r.get_json()["error"]["field"] == "input"
    other = c.post("/v1/sessions", json={"agent": "echo"}, headers=_h(alice)).get_json()["id"]
    _refused(c.post(f"/v1/sessions/{other}/turns", json={"input": "y" * 2001}, headers=_h(alice)),
             "STEPRUN_QUOTA_USER_HISTORY_BYTES")  # the quota is the user's, across sessions
    assert c.post(f"/v1/sessions/{other}/turns", json={"input": "y" * 2000}, headers=_h(alice)).status_code == 202
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.scalar(select(func.count()).select_from(Turn).where(Turn.tenant_id == tenant)) == 2
    assert c.delete(f"/v1/sessions/{sid}", headers=_h(alice)).status_code in (200, 204)
    assert c.post(f"/v1/sessions/{other}/turns", json={"input": "z" * 2500}, headers=_h(alice)).status_code == 202


def test_a_rolled_back_turn_gives_its_input_bytes_back(app_with: Any) -> None:
    _, rt = app_with(quota_user_history_bytes=5000)
    who = Principal(f"t-{secrets.token_hex(3)}", "u")
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "echo", None)
        turn, _ = turns.create_turn(db, rt, who, session.id, "q" * 4000)
    with unit_of_work(rt.sessions, who) as db:
        assert turns.rollback_turn(db, rt, who, turn.id)
    with unit_of_work(rt.sessions, SYSTEM) as db:
        assert db.get(AgentSession, session.id).input_bytes == 0  # type: ignore[union-attr]


def test_the_tenant_queued_cap_holds_however_many_user_ids_a_service_key_names(app_with: Any) -> None:
    c, rt = app_with(max_queued_turns_per_tenant=3, max_queued_turns=20)
    tenant = f"t-{secrets.token_hex(3)}"
    with unit_of_work(rt.sessions, SYSTEM) as db:
        _, service = create_key(db, tenant, None)
    codes = []
    for i in range(5):
        h = _h(service, **{"X-User-Id": f"rotated-{i}"})
        sid = c.post("/v1/sessions", json={"agent": "echo"}, headers=h).get_json()["id"]
        codes.append(c.post(f"/v1/sessions/{sid}/turns", json={"input": "hi"}, headers=h))
    assert [r.status_code for r in codes] == [202, 202, 202, 429, 429]  # no worker runs here: all stay queued
    error = codes[3].get_json()["error"]
    assert error["code"] == "rate_limited" and "STEPRUN_MAX_QUEUED_TURNS_PER_TENANT" in error["message"]
    assert int(codes[3].headers["Retry-After"]) >= 1


def test_a_repeated_idempotency_key_gets_its_turn_back_over_the_limits(app_with: Any) -> None:
    c, rt = app_with(max_queued_turns_per_tenant=1, max_queued_turns=20)
    tenant = f"t-{secrets.token_hex(3)}"
    (key,) = _keys(rt, tenant, "alice")
    sid = c.post("/v1/sessions", json={"agent": "echo"}, headers=_h(key)).get_json()["id"]
    h = _h(key, **{"Idempotency-Key": "once"})
    first = c.post(f"/v1/sessions/{sid}/turns", json={"input": "hi"}, headers=h)
    assert first.status_code == 202
    assert c.post(f"/v1/sessions/{sid}/turns", json={"input": "more"}, headers=_h(key)).status_code == 429
    again = c.post(f"/v1/sessions/{sid}/turns", json={"input": "hi"}, headers=h)  # the client's retry
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
