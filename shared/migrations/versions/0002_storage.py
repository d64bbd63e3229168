"""memory, knowledge and traces

Revision ID: 0002
Revises: 0001

Search is the part that differs by dialect:
- Postgres: a generated ``tsv tsvector`` column (English stemming and stop
  words) with a GIN index, queried with websearch_to_tsquery and ranked with
  ts_rank. Generated, so no write path can forget to fill it.
- SQLite (embedded mode): an FTS5 table over the chunks, kept in step by
  triggers (FK cascades fire them too). Without FTS5 compiled in, the search
  code falls back to term counting with LIKE, so nothing here is required.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "memory_items",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("namespace", sa.String(128), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("value", JSONType, nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memory_items")),
        sa.UniqueConstraint("tenant_id", "user_id", "namespace", "key", name="uq_memory_items_key"),
    )
    op.create_index("ix_memory_items_expires", "memory_items", ["expires_at"])

    op.create_table(
        "knowledge_documents",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("scope", sa.String(10), nullable=False),
        sa.Column("title", sa.String(300), nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_documents")),
    )
    op.create_index("ix_knowledge_documents_owner", "knowledge_documents", ["tenant_id", "user_id", "created_at"])

    op.create_table(
        "knowledge_chunks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("document_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("embedding", JSONType, nullable=True),
        sa.ForeignKeyConstraint(["document_id"], ["knowledge_documents.id"],
                                name=op.f("fk_knowledge_chunks_document_id_knowledge_documents"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knowledge_chunks")),
    )
    op.create_index("ix_knowledge_chunks_document", "knowledge_chunks", ["document_id", "position"])
    op.create_index("ix_knowledge_chunks_owner", "knowledge_chunks", ["tenant_id", "user_id"])

    op.create_table(
        "trace_spans",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("turn_id", sa.String(40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("span_id", sa.String(32), nullable=False),
        sa.Column("parent_span_id", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("attributes", JSONType, nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"],
                                name=op.f("fk_trace_spans_session_id_sessions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"],
                                name=op.f("fk_trace_spans_turn_id_turns"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trace_spans")),
    )
    op.create_index("ix_trace_spans_turn", "trace_spans", ["turn_id", "id"])
    # Deleting a session cascades here; without an index on the FK that is a table scan per session.
    op.create_index("ix_trace_spans_session", "trace_spans", ["session_id"])

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table in ("memory_items", "knowledge_chunks"):
            op.execute(f"ALTER TABLE {table} ADD COLUMN tsv tsvector "
                       "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED")
            op.execute(f"CREATE INDEX ix_{table}_tsv ON {table} USING GIN (tsv)")
        # Tenant-wide documents (user_id NULL) are for every user of the tenant. Migration 0004
        # enables row-level security with its per-user policy; permissive policies are OR'ed,
        # so this one adds exactly the tenant's shared rows (inert until RLS is enabled).
        tenant_rows = ("(user_id IS NULL AND tenant_id = NULLIF(current_setting('steprun.tenant_id', true), ''))")
        for table in ("knowledge_documents", "knowledge_chunks"):
            op.execute(f"CREATE POLICY tenant_shared ON {table} USING {tenant_rows} WITH CHECK {tenant_rows}")
    elif dialect == "sqlite" and _sqlite_has_fts5():
        op.execute("CREATE VIRTUAL TABLE knowledge_chunks_fts USING fts5("
                   "text, content='knowledge_chunks', content_rowid='id', tokenize='porter unicode61')")
        op.execute("CREATE TRIGGER knowledge_chunks_fts_ai AFTER INSERT ON knowledge_chunks BEGIN "
                   "INSERT INTO knowledge_chunks_fts(rowid, text) VALUES (new.id, new.text); END")
        op.execute("CREATE TRIGGER knowledge_chunks_fts_ad AFTER DELETE ON knowledge_chunks BEGIN "
                   "INSERT INTO knowledge_chunks_fts(knowledge_chunks_fts, rowid, text) "
                   "VALUES ('delete', old.id, old.text); END")
        op.execute("CREATE TRIGGER knowledge_chunks_fts_au AFTER UPDATE OF text ON knowledge_chunks BEGIN "
                   "INSERT INTO knowledge_chunks_fts(knowledge_chunks_fts, rowid, text) "
                   "VALUES ('delete', old.id, old.text); "
                   "INSERT INTO knowledge_chunks_fts(rowid, text) VALUES (new.id, new.text); END")


def _sqlite_has_fts5() -> bool:
    found = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM pragma_compile_options WHERE compile_options = 'ENABLE_FTS5'").first()
    return found is not None


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("knowledge_documents", "knowledge_chunks"):
            op.execute(f"DROP POLICY IF EXISTS tenant_shared ON {table}")
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("ai", "ad", "au"):
            op.execute(f"DROP TRIGGER IF EXISTS knowledge_chunks_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS knowledge_chunks_fts")
    op.drop_table("trace_spans")
    op.drop_table("knowledge_chunks")
    op.drop_table("knowledge_documents")
    op.drop_table("memory_items")
