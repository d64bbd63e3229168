"""Memory, knowledge, traces and erasure called as services, on Postgres and on the embedded SQLite file."""
from __future__ import annotations

import io
import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.agent import Agent, AgentRegistry, ToolContext, tool
from shared.auth.principal import SYSTEM, Principal
from shared.db import unit_of_work
from shared.engine.step import build_runtime, run_step
from shared.errors import BadInput, Forbidden, NotFound, TooLarge
from shared.logs import configure_logging
from shared.migrate import upgrade
from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage import knowledge, memory
from shared.storage.sweep import purge_expired_memory
from shared.turns import history
from shared.turns import service as turns
from shared.turns.history import list_spans

GUIDE = """# Billing

## Refunds

Refunds are issued within 14 days of a return. Keep the receipt.

## Shipping

Parcels ship worldwide from the Lisbon warehouse. Delivery takes three to five days.
"""


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, settings: Settings,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A runtime on the test Postgres, or on a fresh SQLite file migrated as `steprun dev` migrates it."""
    if request.param == "postgres":
        runtime = build_runtime(settings)
    else:
        runtime = build_runtime(Settings(data_dir=str(tmp_path_factory.mktemp("sqlite-store"))))
        upgrade(runtime.engine)
    yield runtime
    runtime.close()


def _principal(tenant: str | None = None) -> Principal:
    return Principal(tenant or f"t-{secrets.token_hex(4)}", f"u-{secrets.token_hex(4)}")


def test_memory_crud_search_and_isolation(store: Runtime) -> None:
    alice, bob = _principal(), _principal()
    with unit_of_work(store.sessions, alice) as db:
        _, created = memory.put_item(db, store.settings, alice, "facts", "colour",
                                     {"text": "my favourite colour is teal"})
        assert created
        memory.put_item(db, store.settings, alice, "facts", "city", {"text": "I live in Porto"})
        memory.put_item(db, store.settings, alice, "prefs", "units", "metric")
    with unit_of_work(store.sessions, alice) as db:
        row, created = memory.put_item(db, store.settings, alice, "facts", "colour",
                                       {"text": "my favourite colour is dark teal"})
        assert not created
    with unit_of_work(store.sessions, alice) as db:
        assert memory.get_item(db, alice, "facts", "colour").value == {"text": "my favourite colour is dark teal"}
        hits, _ = memory.search_items(db, alice, "What is my favourite colour?", None, 5)
        assert [h.item.key for h in hits][:1] == ["colour"]
        assert memory.search_items(db, alice, "colour", "prefs", 5)[0] == []  # namespace filter
        page, nxt = memory.list_items(db, alice, None, 2, None)
        rest, end = memory.list_items(db, alice, None, 2, nxt)
        assert len(page) == 2 and nxt and len(rest) == 1 and end is None
        assert {r.key for r in page + rest} == {"colour", "city", "units"}
    with unit_of_work(store.sessions, bob) as db:
        assert memory.search_items(db, bob, "favourite colour", None, 5)[0] == []
        assert memory.list_items(db, bob, None, 10, None)[0] == []
        with pytest.raises(NotFound):
            memory.get_item(db, bob, "facts", "colour")
    with unit_of_work(store.sessions, alice) as db:
        memory.delete_item(db, alice, "facts", "city")
    with unit_of_work(store.sessions, alice) as db:
        with pytest.raises(NotFound):
            memory.get_item(db, alice, "facts", "city")


def test_memory_rejects_bad_input(store: Runtime) -> None:
    who = _principal()
    with unit_of_work(store.sessions, who) as db:
        for namespace, key in [("bad/ns", "k"), ("", "k"), ("ns", ""), ("ns", "a/b"), ("ns", "x" * 257)]:
            with pytest.raises(BadInput):
                memory.put_item(db, store.settings, who, namespace, key, 1)
        with pytest.raises(BadInput, match="ttl_seconds"):
            memory.put_item(db, store.settings, who, "ns", "k", 1, ttl_seconds=0)
        with pytest.raises(TooLarge):
            memory.put_item(db, store.settings, who, "ns", "k", "x" * (store.settings.max_memory_value_bytes + 1))
        assert memory.list_items(db, who, None, 10, None)[0] == []


def test_memory_ttl_hides_then_sweep_purges(store: Runtime) -> None:
    who = _principal()
    with unit_of_work(store.sessions, who) as db:
        memory.put_item(db, store.settings, who, "scratch", "otp", {"text": "code 4242"}, ttl_seconds=1)
        memory.put_item(db, store.settings, who, "scratch", "keep", {"text": "code 1111"})
    time.sleep(1.2)
    with unit_of_work(store.sessions, who) as db:
        with pytest.raises(NotFound):
            memory.get_item(db, who, "scratch", "otp")
        assert [h.item.key for h in memory.search_items(db, who, "code", None, 5)[0]] == ["keep"]
    assert purge_expired_memory(store) >= 1
    with unit_of_work(store.sessions, SYSTEM) as db:
        left = db.execute(text("SELECT key FROM memory_items WHERE user_id = :u"), {"u": who.user_id}).scalars().all()
    assert left == ["keep"]


def test_markdown_is_chunked_under_its_headings() -> None:
    chunks = knowledge.chunk_text(GUIDE + "\n```\n# not a heading\n```\n", "markdown", 1200)
    assert chunks[1].startswith("Billing > Refunds\nRefunds are issued within 14 days")
    assert chunks[2].startswith("Billing > Shipping\n") and "# not a heading" in chunks[2]
    long = knowledge.chunk_text(" ".join(f"Sentence number {i} is here." for i in range(400)), "text", 300)
    assert len(long) > 20 and all(len(c) <= 300 for c in long)
    assert "Sentence number 399 is here." in long[-1]


def test_knowledge_search_ranks_scopes_and_deletes(store: Runtime) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    alice, bob, stranger = _principal(tenant), _principal(tenant), _principal()
    with unit_of_work(store.sessions, alice) as db:
        guide = knowledge.add_document(db, store.settings, alice, {"title": "Shop guide", "text": GUIDE,
                                                                   "format": "markdown"}, service=False)
        with pytest.raises(Forbidden):
            knowledge.add_document(db, store.settings, alice, {"title": "x", "text": "y", "scope": "tenant"},
                                   service=False)
    with unit_of_work(store.sessions, bob, service=True) as db:  # a service key
        handbook = knowledge.add_document(db, store.settings, bob, {
            "title": "Staff handbook", "text": "Holidays: every employee gets 25 days of paid leave.",
            "scope": "tenant"}, service=True)
    with unit_of_work(store.sessions, alice) as db:
        hits = knowledge.search(db, store.settings, alice, "how many days until refunds are issued", 5)
        assert hits[0].document_id == guide.id and "14 days" in hits[0].text
        assert hits[0].score >= hits[-1].score
        assert [h.document_id for h in knowledge.search(db, store.settings, alice, "paid leave", 5)] == [handbook.id]
        assert knowledge.search(db, store.settings, alice, "refunds shipping", 5, match="all") == []
        assert {d.id for d in knowledge.list_documents(db, alice, 10, None)[0]} == {guide.id, handbook.id}
    with unit_of_work(store.sessions, bob) as db:  # same tenant: the tenant's document, not Alice's own
        assert knowledge.search(db, store.settings, bob, "refunds", 5) == []
        with pytest.raises(NotFound):
            knowledge.get_document(db, bob, guide.id)
    with unit_of_work(store.sessions, stranger) as db:  # another tenant: nothing
        assert knowledge.search(db, store.settings, stranger, "paid leave refunds", 5) == []
    with unit_of_work(store.sessions, alice) as db:
        with pytest.raises(Forbidden):
            knowledge.delete_document(db, alice, handbook.id, service=False)
        knowledge.delete_document(db, alice, guide.id, service=False)
    with unit_of_work(store.sessions, alice) as db:
        assert knowledge.search(db, store.settings, alice, "refunds", 5) == []
        left = db.execute(text("SELECT count(*) FROM knowledge_chunks WHERE document_id = :d"), {"d": guide.id})
        assert left.scalar() == 0


class SynonymEmbedder:
    """A stand-in for a semantic model: "car" and "automobile" land on the same vector."""

    def embed(self, texts: list[str]) -> list[list[float]]:
        def vec(t: str) -> list[float]:
            t = t.lower()
            return [float("car" in t.split() or "automobile" in t), float("bicycle" in t), 0.1]
        return [vec(t) for t in texts]


def test_embedding_hook_finds_what_words_alone_miss(store: Runtime) -> None:
    settings = store.settings.replace(embedder="tests.unit.test_storage:SynonymEmbedder")
    who = _principal()
    with unit_of_work(store.sessions, who) as db:
        car = knowledge.add_document(db, settings, who, {"title": "Fleet", "text": "Every car is serviced yearly."},
                                     service=False)
        knowledge.add_document(db, settings, who, {"title": "Bikes", "text": "A bicycle needs no service."},
                               service=False)
    with unit_of_work(store.sessions, who) as db:
        assert knowledge.search(db, store.settings, who, "automobile", 5) == []  # words alone
        hits = knowledge.search(db, settings, who, "automobile", 5)
        assert hits and hits[0].document_id == car.id


def test_erase_user_removes_every_row_of_the_user_and_nothing_else(store: Runtime) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    gone, kept = _principal(tenant), _principal(tenant)
    for who in (gone, kept):
        with unit_of_work(store.sessions, who) as db:
            session = turns.create_session(db, store, who, "echo", {})
            turns.create_turn(db, store, who, session.id, "hello")
            memory.put_item(db, store.settings, who, "facts", "k", {"text": "a fact"})
            knowledge.add_document(db, store.settings, who, {"title": "Mine", "text": "my notes"}, service=False)
    with unit_of_work(store.sessions, gone, service=True) as db:  # a service key
        shared_doc = knowledge.add_document(db, store.settings, gone, {"title": "Team", "text": "team notes",
                                                                       "scope": "tenant"}, service=True)
    with unit_of_work(store.sessions, gone) as db:
        report = history.erase_user(db, store, gone)
    assert report.sessions == 1 and report.turns == 1 and report.memory_items == 1
    assert report.knowledge_documents == 1
    counts = "SELECT (SELECT count(*) FROM {t} WHERE user_id = :u)"
    with unit_of_work(store.sessions, SYSTEM) as db:
        for table in ("sessions", "turns", "messages", "checkpoints", "trace_spans", "memory_items",
                      "knowledge_documents", "knowledge_chunks", "tool_calls", "model_calls"):
            assert db.execute(text(counts.format(t=table)), {"u": gone.user_id}).scalar() == 0, table
        for table in ("sessions", "turns", "memory_items", "knowledge_documents"):
            assert db.execute(text(counts.format(t=table)), {"u": kept.user_id}).scalar() == 1, table
    with unit_of_work(store.sessions, kept) as db:
        assert knowledge.get_document(db, kept, shared_doc.id).title == "Team"  # the tenant's, kept


@tool
def note(text: str, ctx: ToolContext) -> str:
    """Log a line and save a note."""
    logging.getLogger("tests.tool").warning("tool ran for %s", text)
    ctx.memory.put("notes", "last", {"text": text})
    return "noted"


def test_tools_reach_memory_and_log_lines_carry_ids(tmp_path: Path) -> None:
    """Embedded runtime, JSON logs: a tool's own log line names its turn and session."""
    settings = Settings(data_dir=str(tmp_path), log_format="json")
    rt = build_runtime(settings, agents=AgentRegistry([Agent(name="noter", tools=[note])]))
    upgrade(rt.engine)
    stream = io.StringIO()
    root = logging.getLogger()
    saved = [(h, h.formatter, list(h.filters)) for h in root.handlers]
    handler = logging.StreamHandler(stream)
    try:
        configure_logging(settings, handler)
        who = _principal()
        with unit_of_work(rt.sessions, who) as db:
            session = turns.create_session(db, rt, who, "noter", {})
            turn, _ = turns.create_turn(db, rt, who, session.id, "note buy milk")
        deadline = time.time() + 10
        while time.time() < deadline and "tool ran" not in stream.getvalue():
            time.sleep(0.05)
    finally:
        root.removeHandler(handler)
        for h, formatter, filters in saved:
            h.setFormatter(formatter)
            h.filters[:] = filters
        rt.close()
    line = next(json.loads(raw) for raw in stream.getvalue().splitlines() if "tool ran" in raw)
    assert line["turn_id"] == turn.id and line["session_id"] == session.id and line["step"] == 0
    assert line["level"] == "WARNING" and line["message"] == "tool ran for buy milk"


def test_trace_of_a_step_run_directly(rt: Runtime) -> None:
    who = _principal()
    with unit_of_work(rt.sessions, who) as db:
        session = turns.create_session(db, rt, who, "math", {})
        turn, _ = turns.create_turn(db, rt, who, session.id, "add 2 and 3")
    # A worker of another test module may take the step first: either way it commits once.
    run_step(rt, turn.id, 0)
    with unit_of_work(rt.sessions, who) as db:
        deadline = time.time() + 20
        while turns.get_turn(db, who, turn.id).status != "completed" and time.time() < deadline:
            run_step(rt, turn.id, turns.get_turn(db, who, turn.id).step_count)
            db.rollback()
            time.sleep(0.05)
        spans = list_spans(db, who, turn.id)
    assert [(s.step, s.kind) for s in spans] == [(0, "step"), (0, "model"), (0, "tool"), (1, "step"), (1, "model")]
    tool_span = spans[2]
    assert tool_span.name == "add" and tool_span.attributes["arguments"] == {"a": 2, "b": 3}
    assert tool_span.attributes["result_chars"] == 1 and tool_span.parent_span_id == spans[0].span_id
    with unit_of_work(rt.sessions, _principal()) as db, pytest.raises(NotFound):
        list_spans(db, Principal(who.tenant_id, "someone-else"), turn.id)


def test_sqlite_without_fts5_falls_back_to_counting_words(tmp_path: Path) -> None:
    rt = build_runtime(Settings(data_dir=str(tmp_path)))
    upgrade(rt.engine)
    with rt.engine.begin() as conn:  # what a SQLite built without FTS5 would have had from the migration
        for trigger in ("ai", "ad", "au"):
            conn.execute(text(f"DROP TRIGGER knowledge_chunks_fts_{trigger}"))
        conn.execute(text("DROP TABLE knowledge_chunks_fts"))
    who = _principal()
    try:
        with unit_of_work(rt.sessions, who) as db:
            knowledge.add_document(db, rt.settings, who, {"title": "Shop guide", "text": GUIDE,
                                                          "format": "markdown"}, service=False)
        with unit_of_work(rt.sessions, who) as db:
            hits = knowledge.search(db, rt.settings, who, "when are refunds issued", 5)
            assert "14 days" in hits[0].text and hits[0].score == 2  # "refunds" and "issued"
            assert knowledge.search(db, rt.settings, who, "refunds warehouse", 5, match="all") == []
    finally:
        rt.close()


def test_row_security_shares_tenant_documents_only(settings: Settings) -> None:
    """As the application role (RLS enforced), a query with no WHERE at all still sees only what it may."""
    secure = build_runtime(settings.replace(db_role="steprun_app"))
    tenant = f"t-{secrets.token_hex(4)}"
    alice, bob, stranger = _principal(tenant), _principal(tenant), _principal()
    try:
        with unit_of_work(secure.sessions, alice, service=True) as db:  # a service key
            own = knowledge.add_document(db, settings, alice, {"title": "Mine", "text": "alice notes"},
                                         service=False)
            team = knowledge.add_document(db, settings, alice, {"title": "Team", "text": "team notes",
                                                                "scope": "tenant"}, service=True)
            memory.put_item(db, settings, alice, "facts", "k", "alice fact")

        def visible(who: Principal, table: str) -> set[str]:
            with unit_of_work(secure.sessions, who) as db:
                return set(db.execute(text(f"SELECT {'document_id' if table == 'knowledge_chunks' else 'id'} "
                                           f"FROM {table}")).scalars())

        assert visible(alice, "knowledge_documents") == {own.id, team.id}
        assert visible(bob, "knowledge_documents") == {team.id}
        assert visible(bob, "knowledge_chunks") == {team.id}
        assert visible(stranger, "knowledge_documents") == set()
        assert visible(bob, "memory_items") == set()

        # A tool's storage is scoped the same way: the step runs as the turn's principal.
        with unit_of_work(secure.sessions, alice) as db:
            session = turns.create_session(db, secure, alice, "assistant", {})
            turn, _ = turns.create_turn(db, secure, alice, session.id, "remember alice likes tea")
        run_step(secure, turn.id, 0)
        run_step(secure, turn.id, 1)
        with unit_of_work(secure.sessions, alice) as db:
            assert turns.get_turn(db, alice, turn.id).output == (
                "The result of remember is Remembered: alice likes tea.")
            assert [h.item.value["text"] for h in memory.search_items(db, alice, "tea", "facts", 5)[0]] == [
                "alice likes tea"]
    finally:
        secure.close()
