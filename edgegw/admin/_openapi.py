"""The admin API's OpenAPI 3.1 document: the JSON schemas of its answers and :func:`openapi_document`, which builds
the document from the route table (a route cannot be served without being documented). Split out of
edgegw/admin/app.py, which stays the import path.
"""

from __future__ import annotations

from typing import Any

from edgegw.admin.http import Route

API_VERSION = "1"

_OBJ = {"type": "object"}


def _schema_list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


DEVICE_SCHEMA = {"type": "object", "required": ["device_id", "protocol", "version"], "properties": {
    "device_id": {"type": "string"}, "session_key": {"type": "string"}, "peer": {"type": "string"},
    "protocol": {"type": "string", "enum": ["mqtt"]}, "version": {"type": "string"},
    "lab": {"type": "boolean"}, "connected_seconds": {"type": "number"},
    "inflight": {"type": "integer", "description": "QoS 1/2 publishes awaiting their outbox commit"},
    "keepalive": {"type": "integer"}}}
OUTBOX_SCHEMA = {"type": "object", "properties": {
    "depth": {"type": "integer"}, "bytes": {"type": "integer"}, "byte_limit": {"type": "integer"},
    "pending": {"type": "integer"}, "oldest_age_seconds": {"type": ["number", "null"]},
    "commits": {"type": "integer"}, "committed_records": {"type": "integer"},
    "dropped": {"type": "object", "additionalProperties": {"type": "integer"}},
    "expired": {"type": "object", "additionalProperties": {"type": "integer"}},
    "rejected": {"type": "object", "additionalProperties": {"type": "integer"}},
    "quarantined": {"type": ["integer", "null"]},
    "quarantine_dropped": {"type": "object", "additionalProperties": {"type": "integer"}},
    "path": {"type": "string"}}}
UPLINK_SCHEMA = {"type": "object", "properties": {
    "state": {"type": "string", "enum": ["connecting", "connected", "down"]},
    "endpoint": {"type": ["string", "null"]}, "rtt_seconds": {"type": ["number", "null"]},
    "inflight": {"type": "integer"}, "sent": {"type": "integer"}, "acked": {"type": "integer"},
    "refused": {"type": "integer"}, "throttled": {"type": "integer"}, "backlog": {"type": "integer"},
    "drain_eta_seconds": {"type": ["number", "null"]}}}
REFUSAL_SCHEMA = {"type": "object", "properties": {
    "time": {"type": "number"}, "event": {"type": "string"}, "device_id": {"type": "string"},
    "peer": {"type": "string"}, "reason": {"type": "string"}}}
DEVICE_STATE_SCHEMA = {"type": "object", "required": ["device_id", "state"], "properties": {
    "device_id": {"type": "string"}, "state": {"type": "string", "enum": ["active", "suspended"]},
    "previous_state": {"type": "string"}, "reason": {"type": "string"},
    "reloaded": {"type": "boolean", "description": "the gateway re-read the registry (false: see the log)"},
    "disconnected": {"type": "boolean", "description": "a live session was closed"}}}
ERROR_SCHEMA = {"type": "object", "required": ["error", "status"],
                "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 for the admin server, generated from the route table."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary, "tags": [route.tag],
            "operationId": route.handler.__name__ if hasattr(route.handler, "__name__") else route.pattern,
            "responses": {},
        }
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in route.regex.groupindex]
        params += [{"name": name, "in": "query", "required": False, "schema": {"type": typ},
                    "description": desc} for name, typ, desc in route.query]
        if params:
            op["parameters"] = params
        for status, description in route.responses.items():
            response: dict[str, Any] = {"description": description}
            if status < 400:
                schema = route.response_schema if route.content_type == "application/json" else {"type": "string"}
                response["content"] = {route.content_type: {"schema": schema or {}}}
            else:
                response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            op["responses"][str(status)] = response
        paths.setdefault(route.pattern, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgegw admin API", "version": API_VERSION,
                 "description": "Operations endpoints of one edgegw gateway. Bound to loopback by default; "
                                "POST bodies, when present, must be application/json."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA, "Device": DEVICE_SCHEMA, "Outbox": OUTBOX_SCHEMA,
                                   "Uplink": UPLINK_SCHEMA}},
    }
