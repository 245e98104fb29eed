"""The published API: an OpenAPI document that lists the errors the server really sends (400 with
an OpenAI error body, never FastAPI's 422) and the event-stream responses, and a /docs page
rendered here from that document, with no script or stylesheet from a CDN (it works offline)."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def published_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible early-exit server; every error is an OpenAI error body")
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": "bad input",
                                        "content": {"application/json": {
                                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


def docs_page(doc: dict[str, Any]) -> str:
    """A plain HTML page: every route with its summary, request body and responses."""
    rows = []
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            req = body.get("$ref", "").rsplit("/", 1)[-1]
            codes = ", ".join(f"{c} ({r.get('description', '')})" for c, r in op.get("responses", {}).items())
            kinds = sorted({k for r in op.get("responses", {}).values() for k in r.get("content", {})})
            rows.append(f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(req)}</td>"
                        f"<td>{html.escape(codes)}</td><td>{html.escape(', '.join(kinds))}</td></tr>")
    title = html.escape(f"{doc['info']['title']} {doc['info']['version']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>{html.escape(doc['info'].get('description', ''))}. The full schema: "
            "<a href='openapi.json'>openapi.json</a>.</p><table border='1' cellpadding='4'>"
            "<tr><th>route</th><th>summary</th><th>request</th><th>responses</th><th>content types</th></tr>"
            f"{''.join(rows)}</table></body></html>")
