"""Knowledge documents: upload, list, read, delete, search."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request
from werkzeug.routing import BaseConverter

from api.context import db, int_arg, json_body, principal, reject_empty_args, runtime
from api.serialize import ts
from shared.errors import BadInput
from shared.models import KnowledgeDocument
from shared.storage import knowledge

bp = Blueprint("knowledge", __name__, url_prefix="/v1/knowledge")


class DocIdConverter(BaseConverter):
    """A document id: never "search", so /v1/knowledge/search is one route with one method."""

    regex = r"doc_[0-9a-f]{1,64}"


bp.record_once(lambda state: state.app.url_map.converters.setdefault("doc_id", DocIdConverter))


def document_json(row: KnowledgeDocument, *, with_text: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "object": "document",
        "title": row.title,
        "format": row.format,
        "scope": row.scope,
        "chars": len(row.text),
        "chunks": row.chunk_count,
        "created_at": ts(row.created_at),
    }
    if with_text:
        body["text"] = row.text
    return body


@bp.post("")
def add_document():  # type: ignore[no-untyped-def]
    row = knowledge.add_document(db(), runtime().settings, principal(), json_body(),
                                 service=g.get("service_key", False))
    db().commit()
    return jsonify(document_json(row)), 201


@bp.get("")
def list_documents():  # type: ignore[no-untyped-def]
    reject_empty_args("limit")
    limit = int_arg("limit", 20, lo=1, hi=knowledge.MAX_PAGE)
    rows, nxt = knowledge.list_documents(db(), principal(), limit, request.args.get("after") or None)
    return jsonify({"data": [document_json(r) for r in rows], "next": nxt})


@bp.get("/search")
def search():  # type: ignore[no-untyped-def]
    """Chunks best matching ``q`` (any of its words, ranked; ``match=all`` for all of them)."""
    q = request.args.get("q", "").replace("\x00", " ")
    if not q.strip():
        raise BadInput("'q' is required", field="q")
    if len(q) > 1000:
        raise BadInput("'q' is longer than 1000 characters", field="q")
    match = request.args.get("match", "any")
    if match not in ("any", "all"):
        raise BadInput("'match' must be any or all", field="match")
    reject_empty_args("limit", "after")
    limit = int_arg("limit", 5, lo=1, hi=knowledge.MAX_PAGE)
    after = int_arg("after", 0, lo=0, hi=10_000)
    hits = knowledge.search(db(), runtime().settings, principal(), q, limit + 1, after, match)  # type: ignore[arg-type]
    data = [{"object": "knowledge.hit", "document_id": h.document_id, "title": h.title, "chunk": h.position,
             "text": h.text, "score": h.score} for h in hits[:limit]]
    return jsonify({"data": data, "next": after + limit if len(hits) > limit else None})


@bp.get("/<doc_id:doc_id>")
def get_document(doc_id: str):  # type: ignore[no-untyped-def]
    return jsonify(document_json(knowledge.get_document(db(), principal(), doc_id), with_text=True))


@bp.delete("/<doc_id:doc_id>")
def delete_document(doc_id: str):  # type: ignore[no-untyped-def]
    knowledge.delete_document(db(), principal(), doc_id, service=g.get("service_key", False))
    db().commit()
    return jsonify({"id": doc_id, "object": "document", "deleted": True})
