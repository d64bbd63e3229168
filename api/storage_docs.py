"""/openapi.json entries for memory, knowledge, traces, export and erasure."""
from __future__ import annotations

from api.openapi import ERRORS, EXTRA_PATHS, LIMIT, OBJ, SCHEMAS, SID, TID, TS, _page, _ref, op, query

ERRORS.setdefault("403", "not allowed with this key (tenant-wide documents need a service key)")
READ = ("400", "401", "404", "429")

SCHEMAS.update({
    "Memory": {"type": "object", "required": ["namespace", "key", "value"], "properties": {
        "object": {"const": "memory"}, "namespace": {"type": "string"}, "key": {"type": "string"}, "value": {},
        "expires_at": TS, "created_at": TS, "updated_at": TS, "score": {"type": "number"}}},
    "MemoryPut": {"type": "object", "required": ["value"], "properties": {
        "value": {"description": "any JSON"},
        "ttl_seconds": {"type": ["integer", "null"], "minimum": 1, "description": "null or absent: no expiry"}}},
    "Document": {"type": "object", "required": ["id", "title", "format", "scope"], "properties": {
        "id": {"type": "string"}, "object": {"const": "document"}, "title": {"type": "string"},
        "format": {"enum": ["text", "markdown"]}, "scope": {"enum": ["user", "tenant"]},
        "chars": {"type": "integer"}, "chunks": {"type": "integer"}, "text": {"type": "string"},
        "created_at": TS}},
    "DocumentCreate": {"type": "object", "required": ["title", "text"], "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 300}, "text": {"type": "string", "minLength": 1},
        "format": {"enum": ["text", "markdown"]},
        "scope": {"enum": ["user", "tenant"], "description": "tenant: visible to the whole tenant (service keys)"}}},
    "KnowledgeHit": {"type": "object", "properties": {
        "document_id": {"type": "string"}, "title": {"type": "string"}, "chunk": {"type": "integer"},
        "text": {"type": "string"}, "score": {"type": "number"}}},
    "Trace": {"type": "object", "required": ["turn_id", "trace_id", "spans"], "properties": {
        "turn_id": {"type": "string"}, "trace_id": {"type": "string"}, "status": {"type": "string"},
        "spans": {"type": "array", "items": {"type": "object", "properties": {
            "span_id": {"type": "string"}, "parent_span_id": {"type": ["string", "null"]},
            "kind": {"enum": ["step", "model", "tool"]}, "name": {"type": "string"}, "step": {"type": "integer"},
            "attempt": {"type": "integer"}, "status": {"type": "string"}, "started_at": TS, "ended_at": TS,
            "duration_ms": {"type": "number"}, "attributes": {"type": "object"}}}}}},
})

NS = {"name": "namespace", "in": "path", "required": True,
      "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}}
KEY = {"name": "key", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[^/\\x00-\\x1f]{1,256}$"}}
DOC = {"name": "doc_id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^doc_[0-9a-f]{1,64}$"}}
AFTER = query("after", {"type": "string"}, "the previous page's next")
# No maxLength here: the API answers 400 past 1000 characters, and a fuzzer told of a limit sends
# URLs longer than the server's request line (414, before the app sees them).
Q = query("q", {"type": "string"}, "words to search for (at most 1000 characters)")

PUT_MEMORY = op("Create (201) or replace (200) a memory item", "200", _ref("Memory"), body="MemoryPut",
                params=[NS, KEY], errors=("400", "401", "413", "429"))
PUT_MEMORY["responses"]["201"] = PUT_MEMORY["responses"]["200"]

EXTRA_PATHS.append({
    "/v1/memory/{namespace}/{key}": {
        "put": PUT_MEMORY,
        "get": op("One memory item", "200", _ref("Memory"), params=[NS, KEY]),
        "delete": op("Delete a memory item", "200", OBJ, params=[NS, KEY]),
    },
    "/v1/memory": {"get": op("Your memory, newest first; with q, best match first", "200", _page("Memory"),
                             params=[query("namespace", {"type": "string"}), Q, LIMIT, AFTER], errors=READ)},
    "/v1/knowledge": {
        "post": op("Upload a document (chunked for search)", "201", _ref("Document"), body="DocumentCreate",
                   errors=("400", "401", "403", "413", "429")),
        "get": op("Documents you can search (yours and your tenant's), newest first", "200", _page("Document"),
                  params=[LIMIT, AFTER], errors=READ),
    },
    "/v1/knowledge/search": {"get": op("Document chunks best matching q", "200", _page("KnowledgeHit"),
                                       params=[dict(Q, required=True), query("match", {"enum": ["any", "all"]}),
                                               LIMIT, AFTER],
                                       errors=READ)},
    "/v1/knowledge/{doc_id}": {
        "get": op("One document, with its text", "200", _ref("Document"), params=[DOC]),
        "delete": op("Delete a document", "200", OBJ, params=[DOC], errors=("400", "401", "403", "404", "429")),
    },
    "/v1/turns/{turn_id}/trace": {"get": op("Spans of the turn: steps, model calls, tool calls", "200",
                                            _ref("Trace"), params=[TID])},
    "/v1/sessions/{session_id}/export": {"get": op("The whole session: turns, messages, checkpoint, traces", "200",
                                                   OBJ, params=[SID])},
    "/v1/users/me/data": {"delete": op("Erase everything of the calling user", "200", OBJ,
                                       errors=("401", "429"))},
})
