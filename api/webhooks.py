"""Webhook endpoints in OpenAI's format, so its client manages them (DESIGN section 11.2).

Tenant-wide: every route takes a service key (no X-User-Id needed); a key that
acts as one user gets 403. Lists have OpenAI's shape (``object: "list"``,
``data``, ``first_id``, ``last_id``, ``has_more``) and page with ``after``.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from api.auth import tenant_wide
from api.context import db, int_arg, json_body, runtime
from api.openapi import AFTER_PAGE, LIMIT, TS, RouteDocs, op, path_param, query, ref
from api.serialize import ts
from shared.clock import aware
from shared.models import WebhookDelivery, WebhookEndpoint
from shared.webhooks import endpoints
from shared.webhooks.outbox import EVENT_TYPES
from shared.webhooks.signing import secret_hint

bp = Blueprint("webhooks", __name__)
ENDPOINT = path_param("webhook_endpoint_id")
DELIVERY = path_param("delivery_id")
TENANT_ERRORS = ("400", "401", "403", "404", "429")
MAX_PAGE = 100


def _list(item: str) -> dict[str, Any]:
    return {"type": "object", "required": ["object", "data", "has_more"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": ref(item)},
        "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"}}}


def describe() -> RouteDocs:
    base = "/v1/webhook_endpoints"
    one = f"{base}/{{webhook_endpoint_id}}"
    return RouteDocs({
        base: {
            "post": op("Create a webhook endpoint (the signing secret is shown only here and on rotation)", "200",
                       ref("WebhookEndpointWithSecret"), body="WebhookEndpointCreate",
                       errors=("400", "401", "403", "409", "429")),
            "get": op("The tenant's webhook endpoints, newest first", "200", _list("WebhookEndpoint"),
                      params=[LIMIT, AFTER_PAGE], errors=TENANT_ERRORS),
        },
        one: {
            "get": op("One webhook endpoint", "200", ref("WebhookEndpoint"), params=[ENDPOINT],
                      errors=TENANT_ERRORS),
            "post": op("Change name, url or event_types", "200", ref("WebhookEndpoint"), params=[ENDPOINT],
                       body="WebhookEndpointUpdate", errors=TENANT_ERRORS),
            "delete": op("Delete the endpoint and its delivery log", "200", ref("DeletedWebhookEndpoint"),
                         params=[ENDPOINT], errors=TENANT_ERRORS),
        },
        f"{one}/rotate_secret": {
            "post": op("New signing secret (optionally keep the old one valid for 24 h)", "200",
                       ref("WebhookEndpointWithSecret"), params=[ENDPOINT], body="WebhookRotateSecret",
                       errors=TENANT_ERRORS)},
        f"{one}/test": {
            "post": op("Send a signed sample event now and report the endpoint's answer", "200",
                       ref("WebhookEndpointTestResult"), params=[ENDPOINT], body="WebhookTest",
                       errors=TENANT_ERRORS)},
        f"{one}/deliveries": {
            "get": op("The endpoint's delivery log, newest first", "200", _list("WebhookDelivery"),
                      params=[ENDPOINT, LIMIT, AFTER_PAGE,
                              query("status", {"enum": list(endpoints.DELIVERY_STATUSES)})],
                      errors=TENANT_ERRORS)},
        f"{one}/deliveries/{{delivery_id}}/redeliver": {
            "post": op("Send a delivery again now (same webhook-id), retrying it for a new window", "200",
                       ref("WebhookDelivery"), params=[ENDPOINT, DELIVERY], errors=TENANT_ERRORS)},
        "/v1/webhook_event_types": {
            "get": op("The event types steprun sends", "200", {"type": "object", "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "string"}}}},
                errors=("401", "403", "429"))},
    }, schemas={
        "WebhookEndpoint": _endpoint_schema(with_secret=False),
        "WebhookEndpointWithSecret": _endpoint_schema(with_secret=True),
        "WebhookEndpointCreate": {"type": "object", "required": ["name", "url", "event_types"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "url": {"type": "string", "format": "uri"},
            "event_types": {"type": "array", "minItems": 1, "items": {"enum": list(EVENT_TYPES)}}}},
        "WebhookEndpointUpdate": {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "url": {"type": "string", "format": "uri"},
            "event_types": {"type": "array", "minItems": 1, "items": {"enum": list(EVENT_TYPES)}}}},
        "WebhookRotateSecret": {"type": "object", "properties": {
            "keep_old_secret_active_for_24_hours": {"type": "boolean"}}},
        "WebhookTest": {"type": "object", "required": ["event_type"], "properties": {
            "event_type": {"enum": list(EVENT_TYPES)}}},
        "WebhookEndpointTestResult": {"type": "object", "properties": {
            "object": {"const": "webhook_endpoint.test"}, "webhook_endpoint_id": {"type": "string"},
            "event_type": {"type": "string"}, "status_code": {"type": "integer"}, "success": {"const": True},
            "error": {"type": "string"}}},
        "DeletedWebhookEndpoint": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "webhook_endpoint.deleted"}, "deleted": {"const": True}}},
        "WebhookDelivery": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"const": "webhook_delivery"},
            "webhook_endpoint_id": {"type": "string"},
            "event_id": {"type": "string"}, "event_type": {"type": "string"},
            "status": {"enum": list(endpoints.DELIVERY_STATUSES)}, "attempts": {"type": "integer"},
            "next_attempt_at": TS, "last_attempt_at": TS, "last_status_code": {"type": ["integer", "null"]},
            "last_error": {"type": ["string", "null"]}, "retry_until": TS, "created_at": TS, "delivered_at": TS}},
    })


def _endpoint_schema(with_secret: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "id": {"type": "string"}, "object": {"const": "webhook_endpoint"}, "name": {"type": "string"},
        "url": {"type": "string"}, "event_types": {"type": "array", "items": {"type": "string"}},
        "created_at": {"type": "integer"}, "updated_at": {"type": "integer"},
        "signing_secret_hint": {"type": "string"}}
    required = ["id", "object", "name", "url", "event_types", "created_at"]
    if with_secret:
        props["signing_secret"] = {"type": "string", "pattern": "^whsec_"}
        required.append("signing_secret")
    return {"type": "object", "required": required, "properties": props}


def _unix(value: datetime) -> int:
    return int(aware(value).timestamp())


def endpoint_json(row: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id, "object": "webhook_endpoint", "name": row.name, "url": row.url,
        "event_types": list(row.event_types), "created_at": _unix(row.created_at),
        "updated_at": _unix(row.updated_at), "signing_secret_hint": secret_hint(row.signing_secret),
    }
    if with_secret:
        body["signing_secret"] = row.signing_secret
    return body


def delivery_json(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": row.id, "object": "webhook_delivery", "webhook_endpoint_id": row.endpoint_id,
        "event_id": row.event_id, "event_type": row.event_type, "status": row.status, "attempts": row.attempts,
        "next_attempt_at": ts(row.next_attempt_at) if row.status == "pending" else None,
        "last_attempt_at": ts(row.last_attempt_at), "last_status_code": row.last_status_code,
        "last_error": row.last_error, "retry_until": ts(row.retry_until), "created_at": ts(row.created_at),
        "delivered_at": ts(row.delivered_at),
    }


def _openai_list(items: list[dict[str, Any]], more: bool) -> Response:
    return jsonify({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                    "last_id": items[-1]["id"] if items else None, "has_more": more})


def _tenant() -> str:
    return g.tenant.tenant_id


@bp.post("/v1/webhook_endpoints")
@tenant_wide
def create_endpoint() -> Response:
    row = endpoints.create_endpoint(db(), runtime().settings, _tenant(), json_body())
    db().commit()
    return jsonify(endpoint_json(row, with_secret=True))


@bp.get("/v1/webhook_endpoints")
@tenant_wide
def list_endpoints() -> Response:
    limit = int_arg("limit", 20, lo=1, hi=MAX_PAGE)
    rows, nxt = endpoints.list_endpoints(db(), _tenant(), limit, request.args.get("after") or None)
    return _openai_list([endpoint_json(r) for r in rows], nxt is not None)


@bp.get("/v1/webhook_endpoints/<webhook_endpoint_id>")
@tenant_wide
def get_endpoint(webhook_endpoint_id: str) -> Response:
    return jsonify(endpoint_json(endpoints.get_endpoint(db(), _tenant(), webhook_endpoint_id)))


@bp.post("/v1/webhook_endpoints/<webhook_endpoint_id>")
@tenant_wide
def update_endpoint(webhook_endpoint_id: str) -> Response:
    row = endpoints.update_endpoint(db(), runtime().settings, _tenant(), webhook_endpoint_id, json_body())
    db().commit()
    return jsonify(endpoint_json(row))


@bp.delete("/v1/webhook_endpoints/<webhook_endpoint_id>")
@tenant_wide
def delete_endpoint(webhook_endpoint_id: str) -> Response:
    endpoints.delete_endpoint(db(), _tenant(), webhook_endpoint_id)
    db().commit()
    return jsonify({"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True})


@bp.post("/v1/webhook_endpoints/<webhook_endpoint_id>/rotate_secret")
@tenant_wide
def rotate_secret(webhook_endpoint_id: str) -> Response:
    row = endpoints.rotate_secret(db(), _tenant(), webhook_endpoint_id,
                                  json_body().get("keep_old_secret_active_for_24_hours"))
    db().commit()
    return jsonify(endpoint_json(row, with_secret=True))


@bp.post("/v1/webhook_endpoints/<webhook_endpoint_id>/test")
@tenant_wide
def test_endpoint(webhook_endpoint_id: str) -> Response:
    return jsonify(endpoints.send_test(db(), runtime().settings, _tenant(), webhook_endpoint_id,
                                       json_body().get("event_type")))


@bp.get("/v1/webhook_endpoints/<webhook_endpoint_id>/deliveries")
@tenant_wide
def list_deliveries(webhook_endpoint_id: str) -> Response:
    limit = int_arg("limit", 20, lo=1, hi=MAX_PAGE)
    rows, nxt = endpoints.list_deliveries(db(), _tenant(), webhook_endpoint_id, limit,
                                          request.args.get("after") or None, request.args.get("status") or None)
    return _openai_list([delivery_json(r) for r in rows], nxt is not None)


@bp.post("/v1/webhook_endpoints/<webhook_endpoint_id>/deliveries/<delivery_id>/redeliver")
@tenant_wide
def redeliver(webhook_endpoint_id: str, delivery_id: str) -> Response:
    row = endpoints.redeliver(db(), runtime().settings, _tenant(), webhook_endpoint_id, delivery_id)
    db().commit()
    return jsonify(delivery_json(row))


@bp.get("/v1/webhook_event_types")
@tenant_wide
def event_types() -> Response:
    return jsonify({"object": "list", "data": list(EVENT_TYPES)})
