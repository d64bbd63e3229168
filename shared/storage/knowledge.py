"""Knowledge: documents a tenant or a user uploads, chunked and searchable by agents.

A document is ``user`` scoped (visible to its owner) or ``tenant`` scoped
(visible to every user of the tenant; only a service key may write one).
Search ranks chunks with the database's own full-text search: Postgres
(tsvector, websearch_to_tsquery, ts_rank, a GIN index), SQLite FTS5 with bm25,
or, where FTS5 is missing, a count of matching words. An optional embedder
(:mod:`shared.storage.embeddings`) adds a vector ranking fused with the text one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.auth.principal import Principal
from shared.db import unit_of_work
from shared.errors import BadInput, Forbidden, NotFound, TooLarge
from shared.models import KnowledgeChunk, KnowledgeDocument
from shared.paging import page
from shared.settings import Settings
from shared.storage import quotas, textsearch
from shared.storage.embeddings import cosine, load_embedder

FORMATS = ("text", "markdown")
SCOPES = ("user", "tenant")
MAX_TITLE_CHARS = 300
MAX_PAGE = 100
RRF_K = 60  # the usual reciprocal-rank-fusion constant: damps the weight of the very top ranks
DOC_ID_RE = re.compile(r"doc_[0-9a-f]{1,64}")


# --- chunking ----------------------------------------------------------------

def chunk_text(body: str, fmt: str, max_chars: int) -> list[str]:
    """Split a document into chunks of at most ``max_chars``, at paragraph, then sentence, then word bounds.

    Markdown chunks start with their heading path ("Billing > Refunds"), so a
    chunk about refunds is found by the heading's words too.
    """
    chunks: list[str] = []
    for heading, section in _sections(body) if fmt == "markdown" else [("", body)]:
        prefix = f"{heading}\n" if heading else ""
        budget = max(100, max_chars - len(prefix))
        pieces = [piece for para in re.split(r"\n\s*\n", section) if para.strip()
                  for piece in _split_long(para.strip(), budget)]
        current = ""
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > budget:
                chunks.append(prefix + current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
        if current:
            chunks.append(prefix + current)
        elif heading and not pieces:
            chunks.append(heading)  # a heading with nothing under it still names a topic
    return chunks


def _sections(body: str) -> list[tuple[str, str]]:
    """Markdown cut at headings (not inside ``` fences): (heading path, text under it)."""
    sections: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    fenced = False

    def close() -> None:
        if lines or path:
            sections.append((" > ".join(t for _, t in path), "\n".join(lines)))

    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else _heading(line)
        if heading:
            close()
            lines = []
            level, title = heading
            path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
        else:
            lines.append(line)
    close()
    return sections


def _heading(line: str) -> tuple[int, str] | None:
    """An ATX heading's (level, title), or None: ``## Title ##`` -> (2, "Title").

    Parsed by hand, in one pass: the regex this replaces (``^(#{1,6})\\s+(.+?)\\s*#*\\s*$``)
    backtracked cubically on a run of spaces not ending the line, and a 4 KB
    upload held a web worker's event loop for a minute.
    """
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or level == len(line) or not line[level].isspace():
        return None
    title = line[level:].strip()
    closed = title.rstrip("#")
    if closed != title and (not closed or closed[-1].isspace()):
        title = closed.rstrip()  # a closing run of #s, set off by a space, is not part of the title
    return (level, title) if title else None


def _split_long(paragraph: str, budget: int) -> list[str]:
    if len(paragraph) <= budget:
        return [paragraph]
    out: list[str] = []
    current = ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        while len(sentence) > budget:  # one endless sentence: cut at the last space that fits
            cut = sentence.rfind(" ", 0, budget)
            cut = cut if cut > budget // 2 else budget
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > budget:
            out.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
    if current:
        out.append(current)
    return out


# --- documents ---------------------------------------------------------------

def add_document(db: Session, settings: Settings, who: Principal, body: dict[str, Any],
                 *, service: bool, quota: sessionmaker[Session] | None = None) -> KnowledgeDocument:
    """Validate, chunk (and embed, if configured) and store a document.

    With ``quota`` (the sessions the system-path check runs on), the document must fit the user's and
    the tenant's document quotas (:mod:`shared.storage.quotas`): checked before the chunking and the
    embedding, and again under the tenant's document lock before anything is written.
    """
    title, content = body.get("title"), body.get("text")
    fmt, scope = body.get("format", "text"), body.get("scope", "user")
    if not isinstance(title, str) or not title.strip():
        raise BadInput("'title' is required and must be a non-empty string", field="title")
    if len(title) > MAX_TITLE_CHARS:  # a field's own limit: bad input (413 is for the body and the text)
        raise BadInput(f"'title' is longer than {MAX_TITLE_CHARS} characters", field="title")
    if not isinstance(content, str) or not content.strip():
        raise BadInput("'text' is required and must be a non-empty string", field="text")
    if len(content) > settings.max_document_chars:
        raise TooLarge(f"'text' is longer than {settings.max_document_chars} characters", field="text")
    for name, value in (("title", title), ("text", content)):
        if "\x00" in value:  # Postgres text cannot hold NUL
            raise BadInput(f"'{name}' contains a NUL character", field=name)
    if fmt not in FORMATS:
        raise BadInput(f"'format' must be one of {', '.join(FORMATS)}", field="format")
    if scope not in SCOPES:
        raise BadInput(f"'scope' must be one of {', '.join(SCOPES)}", field="scope")
    if scope == "tenant" and not service:
        raise Forbidden("only a service key may write tenant-wide documents", field="scope")
    owner = None if scope == "tenant" else who.user_id
    if quota is not None:
        quotas.check_document(quota, settings, who, len(content.encode()), tenant_wide=scope == "tenant")
    pieces = chunk_text(content, fmt, settings.knowledge_chunk_chars)
    embedder = load_embedder(settings.embedder)
    vectors: list[list[float] | None] = list(embedder.embed(pieces)) if embedder else [None] * len(pieces)
    if quota is not None:  # again, one upload of the tenant at a time: uploads at once cannot pass it together
        quotas.serialise_new_documents(db, settings, who)
        quotas.check_document(quota, settings, who, len(content.encode()), tenant_wide=scope == "tenant")
    doc = KnowledgeDocument(tenant_id=who.tenant_id, user_id=owner, scope=scope, title=title.strip(),
                            format=fmt, text=content, chunk_count=len(pieces))
    db.add(doc)
    db.flush()
    for i, (piece, vector) in enumerate(zip(pieces, vectors, strict=True)):
        chunk = KnowledgeChunk(document_id=doc.id, tenant_id=who.tenant_id, user_id=owner, position=i, text=piece)
        if vector is not None:  # left unset otherwise: SQL NULL, not a JSON 'null' the vector scan would read
            chunk.embedding = vector
        db.add(chunk)
    db.flush()
    return doc


def _visible(who: Principal) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (KnowledgeDocument.tenant_id == who.tenant_id,
            or_(KnowledgeDocument.user_id == who.user_id, KnowledgeDocument.user_id.is_(None)))


def get_document(db: Session, who: Principal, doc_id: str) -> KnowledgeDocument:
    row = db.scalars(select(KnowledgeDocument).where(KnowledgeDocument.id == doc_id, *_visible(who))).first()
    if row is None:
        raise NotFound(f"no document {doc_id!r}")
    return row


def list_documents(db: Session, who: Principal, limit: int,
                   after: str | None) -> tuple[list[KnowledgeDocument], str | None]:
    """Newest first, the user's own and the tenant's."""
    query = select(KnowledgeDocument).where(*_visible(who))
    if after and not DOC_ID_RE.fullmatch(after):
        raise BadInput("'after' must be a document id from a previous page's next", field="after")
    if after:
        anchor = db.scalars(query.where(KnowledgeDocument.id == after)).first()
        if anchor is None:
            raise BadInput(f"'after' {after!r} is not a document you can see", field="after")
        query = query.where(
            (KnowledgeDocument.created_at < anchor.created_at)
            | ((KnowledgeDocument.created_at == anchor.created_at) & (KnowledgeDocument.id < anchor.id)))
    rows = db.scalars(query.order_by(KnowledgeDocument.created_at.desc(), KnowledgeDocument.id.desc())
                      .limit(limit + 1))
    return page(rows, limit, lambda row: row.id)


def delete_document(db: Session, who: Principal, doc_id: str, *, service: bool) -> None:
    """Delete a document and its chunks (FK cascade)."""
    row = get_document(db, who, doc_id)
    if row.scope == "tenant" and not service:
        raise Forbidden("only a service key may delete tenant-wide documents")
    db.delete(row)
    db.flush()


# --- search ------------------------------------------------------------------

@dataclass
class Hit:
    chunk_id: int
    document_id: str
    title: str
    position: int
    text: str
    score: float


def search(db: Session, settings: Settings, who: Principal, q: str, limit: int, offset: int = 0,
           match: textsearch.Match = "any") -> list[Hit]:
    """The chunks ``who`` may see that best match ``q``, best first."""
    if not textsearch.terms(q):
        return []
    embedder = load_embedder(settings.embedder)
    if embedder is None:
        ranked = _text_ranked(db, who, q, match, limit, offset)
    else:
        pool = max(50, offset + limit)
        fused: dict[int, float] = {}
        for ranking in (_text_ranked(db, who, q, match, pool, 0),
                        _vector_ranked(db, settings, who, embedder.embed([q])[0], pool)):
            for rank, (chunk_id, _) in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[offset:offset + limit]
    if not ranked:
        return []
    rows = db.execute(select(KnowledgeChunk, KnowledgeDocument.title)
                      .join(KnowledgeDocument, KnowledgeDocument.id == KnowledgeChunk.document_id)
                      .where(KnowledgeChunk.id.in_([cid for cid, _ in ranked]))).all()
    by_id = {chunk.id: (chunk, title) for chunk, title in rows}
    return [Hit(cid, by_id[cid][0].document_id, by_id[cid][1], by_id[cid][0].position, by_id[cid][0].text,
                round(score, 6)) for cid, score in ranked if cid in by_id]


_SCOPE_SQL = "c.tenant_id = :tenant AND (c.user_id = :user OR c.user_id IS NULL)"


def _text_ranked(db: Session, who: Principal, q: str, match: textsearch.Match, limit: int,
                 offset: int) -> list[tuple[int, float]]:
    params: dict[str, Any] = {"tenant": who.tenant_id, "user": who.user_id, "limit": limit, "offset": offset}
    kind = textsearch.dialect(db)
    if kind == "postgresql":
        params["q"] = textsearch.postgres_query(q, match)
        sql = ("SELECT c.id, ts_rank(c.tsv, query) AS score "
               "FROM knowledge_chunks c, websearch_to_tsquery('english', :q) query "
               f"WHERE c.tsv @@ query AND {_SCOPE_SQL} ORDER BY score DESC, c.id LIMIT :limit OFFSET :offset")
    elif kind == "sqlite" and _has_fts5(db):
        params["q"] = textsearch.fts5_query(q, match)
        # bm25() is lower for better matches: negate it so every backend ranks "higher is better".
        sql = ("SELECT c.id, -bm25(knowledge_chunks_fts) AS score FROM knowledge_chunks_fts "
               "JOIN knowledge_chunks c ON c.id = knowledge_chunks_fts.rowid "
               f"WHERE knowledge_chunks_fts MATCH :q AND {_SCOPE_SQL} "
               "ORDER BY score DESC, c.id LIMIT :limit OFFSET :offset")
    else:
        score = textsearch.term_count(KnowledgeChunk.text, q)
        needed = len(textsearch.terms(q)) if match == "all" else 1
        rows = db.execute(
            select(KnowledgeChunk.id, score.label("score"))
            .where(KnowledgeChunk.tenant_id == who.tenant_id,
                   or_(KnowledgeChunk.user_id == who.user_id, KnowledgeChunk.user_id.is_(None)),
                   score >= needed)
            .order_by(score.desc(), KnowledgeChunk.id).limit(limit).offset(offset)).all()
        return [(r[0], float(r[1])) for r in rows]
    return [(r[0], float(r[1])) for r in db.execute(text(sql), params).all()]


def _vector_ranked(db: Session, settings: Settings, who: Principal, query_vector: list[float],
                   limit: int) -> list[tuple[int, float]]:
    """Cosine over the newest embedded chunks ``who`` can see: a bounded scan, not an index (see README)."""
    rows = db.execute(
        select(KnowledgeChunk.id, KnowledgeChunk.embedding)
        .where(KnowledgeChunk.tenant_id == who.tenant_id,
               or_(KnowledgeChunk.user_id == who.user_id, KnowledgeChunk.user_id.is_(None)),
               KnowledgeChunk.embedding.is_not(None))
        .order_by(KnowledgeChunk.id.desc()).limit(settings.vector_scan_limit)).all()
    scored = sorted(((cid, cosine(query_vector, vec)) for cid, vec in rows if vec), key=lambda kv: -kv[1])
    return [(cid, s) for cid, s in scored[:limit] if s > 0]


def _has_fts5(db: Session) -> bool:
    # Decided by the migration (FTS5 compiled in or not); one cheap catalogue read per search.
    return db.execute(text("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                           "AND name = 'knowledge_chunks_fts'")).first() is not None


class KnowledgeBase:
    """Knowledge search for one principal, as a tool sees it (``ctx.knowledge``)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, who: Principal):
        self._sessions, self._settings, self._who = sessions, settings, who

    def search(self, query: str, limit: int = 5, match: Literal["any", "all"] = "any") -> list[Hit]:
        with unit_of_work(self._sessions, self._who) as db:
            return search(db, self._settings, self._who, query, min(limit, MAX_PAGE), 0, match)
