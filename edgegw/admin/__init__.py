"""The operator's HTTP server (metrics, health, JSON API, OpenAPI, status page). See docs/OPERATIONS.md."""

from edgegw.admin.app import AdminServer, openapi_document

__all__ = ["AdminServer", "openapi_document"]
