"""Knowledge documents: upload, list, read, delete, search."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import BaseConverter

from api.context import db, int_arg, json_body, principal, reject_empty_args, runtime
from api.openapi import AFTER_PAGE, LIMIT, OBJ, SEARCH_Q, TS, RouteDocs, op, page, query, ref
from api.serialize import ts
from shared.errors import BadInput
from shared.models import KnowledgeDocument
from shared.storage import knowledge, textsearch

bp = Blueprint("knowledge", __name__, url_prefix="/v1/knowledge")


class DocIdConverter(BaseConverter):
    """A document id: never "search", so /v1/knowledge/search is one route with one method."""

    regex = r"doc_[0-9a-f]{1,64}"


@bp.record_once
def _add_doc_id_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault("doc_id", DocIdConverter)


MATCHES: dict[str, textsearch.Match] = {"any": "any", "all": "all"}
DOC = {"name": "doc_id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^doc_[0-9a-f]{1,64}$"}}


def describe() -> RouteDocs:
    return RouteDocs({
        "/v1/knowledge": {
            "post": op("Upload a document (chunked for search)", "201", ref("Document"), body="DocumentCreate",
                       errors=("400", "401", "403", "413", "429")),
            "get": op("Documents you can search (yours and your tenant's), newest first", "200", page("Document"),
                      params=[LIMIT, AFTER_PAGE]),
        },
        "/v1/knowledge/search": {"get": op("Document chunks best matching q", "200", page("KnowledgeHit"),
                                           params=[dict(SEARCH_Q, required=True),
                                                   query("match", {"enum": ["any", "all"]}), LIMIT, AFTER_PAGE])},
        "/v1/knowledge/{doc_id}": {
            "get": op("One document, with its text", "200", ref("Document"), params=[DOC]),
            "delete": op("Delete a document", "200", OBJ, params=[DOC], errors=("400", "401", "403", "404", "429")),
        },
    }, schemas={
        "Document": {"type": "object", "required": ["id", "title", "format", "scope"], "properties": {
            "id": {"type": "string"}, "object": {"const": "document"}, "title": {"type": "string"},
            "format": {"enum": ["text", "markdown"]}, "scope": {"enum": ["user", "tenant"]},
            "chars": {"type": "integer"}, "chunks": {"type": "integer"}, "text": {"type": "string"},
            "created_at": TS}},
        "DocumentCreate": {"type": "object", "required": ["title", "text"], "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 300},
            "text": {"type": "string", "minLength": 1}, "format": {"enum": ["text", "markdown"]},
            "scope": {"enum": ["user", "tenant"],
                      "description": "tenant: visible to the whole tenant (service keys)"}}},
        "KnowledgeHit": {"type": "object", "properties": {
            "document_id": {"type": "string"}, "title": {"type": "string"}, "chunk": {"type": "integer"},
            "text": {"type": "string"}, "score": {"type": "number"}}},
    })


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
def add_document() -> tuple[Response, int]:
    rt = runtime()
    row = knowledge.add_document(db(), rt.settings, principal(), json_body(),
                                 service=g.get("service_key", False), quota=rt.sessions)
    db().commit()
    return jsonify(document_json(row)), 201


@bp.get("")
def list_documents() -> Response:
    reject_empty_args("limit")
    limit = int_arg("limit", 20, lo=1, hi=knowledge.MAX_PAGE)
    rows, nxt = knowledge.list_documents(db(), principal(), limit, request.args.get("after") or None)
    return jsonify({"data": [document_json(r) for r in rows], "next": nxt})


@bp.get("/search")
def search() -> Response:
    """Chunks best matching ``q`` (any of its words, ranked; ``match=all`` for all of them)."""
    q = request.args.get("q", "").replace("\x00", " ")
    if not q.strip():
        raise BadInput("'q' is required", field="q")
    if len(q) > 1000:
        raise BadInput("'q' is longer than 1000 characters", field="q")
    match = MATCHES.get(request.args.get("match", "any"))
    if match is None:
        raise BadInput("'match' must be any or all", field="match")
    reject_empty_args("limit", "after")
    limit = int_arg("limit", 5, lo=1, hi=knowledge.MAX_PAGE)
    after = int_arg("after", 0, lo=0, hi=10_000)
    hits = knowledge.search(db(), runtime().settings, principal(), q, limit + 1, after, match)
    data = [{"object": "knowledge.hit", "document_id": h.document_id, "title": h.title, "chunk": h.position,
             "text": h.text, "score": h.score} for h in hits[:limit]]
    return jsonify({"data": data, "next": after + limit if len(hits) > limit else None})


@bp.get("/<doc_id:doc_id>")
def get_document(doc_id: str) -> Response:
    return jsonify(document_json(knowledge.get_document(db(), principal(), doc_id), with_text=True))


@bp.delete("/<doc_id:doc_id>")
def delete_document(doc_id: str) -> Response:
    knowledge.delete_document(db(), principal(), doc_id, service=g.get("service_key", False))
    db().commit()
    return jsonify({"id": doc_id, "object": "document", "deleted": True})
