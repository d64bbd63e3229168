"""GET /openapi.json describes every route the app serves."""
from __future__ import annotations

import re

from openapi_spec_validator import validate

from api.app import create_app
from shared.runtime import Runtime


def test_every_route_is_described_and_the_document_is_valid(rt: Runtime) -> None:
    app = create_app(rt.settings, runtime=rt)
    doc = app.test_client().get("/openapi.json").get_json()
    validate(doc)
    described = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/console"):
            continue  # the web console's pages are HTML for operators, not API routes
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if (path, method) not in described:
                missing.append(f"{method} {path}")
    assert not missing, f"routes missing from /openapi.json: {missing}"
