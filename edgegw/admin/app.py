"""The admin server: health, Prometheus metrics, a JSON API, its OpenAPI document and the status page.

Routes are declared once in :meth:`AdminServer._routes`; the OpenAPI document is generated from that table, so a
route cannot be served without being documented. Everything is read from the live :class:`~edgegw.daemon.Gateway`
at request time (the MQTT engine, outbox and uplink change under us: reads are defensive, see
:mod:`edgegw.ops.metrics`).

The server runs on the gateway's event loop. If its port cannot be bound the gateway still runs (the data path
matters more than the dashboard) and ``admin.bind_failed`` is logged as an error.

This module is the admin server's import path and holds :class:`AdminServer` (lifecycle, route table, health,
metrics, outbox, quarantine, reload, stats, pages); the rest lives in modules of one job each: _devices.py (the
device routes: list, disconnect, suspend, resume; a mixin), _openapi.py (the answers' JSON schemas and
:func:`openapi_document`), _listen.py (TLS context, Host names accepted on loopback, URL host).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import ssl
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from edgegw.admin._devices import DeviceHandlers
from edgegw.admin._listen import _allowed_hosts, _url_host, admin_ssl_context
from edgegw.admin._openapi import (
    _OBJ,
    API_VERSION,
    DEVICE_SCHEMA,
    DEVICE_STATE_SCHEMA,
    ERROR_SCHEMA,
    OUTBOX_SCHEMA,
    REFUSAL_SCHEMA,
    UPLINK_SCHEMA,
    _schema_list,
    openapi_document,
)
from edgegw.admin.http import HTTPServer, Request, Response, Route, Router
from edgegw.ops.logsink import RECENT_REFUSALS
from edgegw.ops.metrics import (
    GatewayCollector,
    OutboxReader,
    Sampler,
    _num,
    certificate_expiry,
)

if TYPE_CHECKING:
    from edgegw.daemon import Gateway

__all__ = [
    "API_VERSION",
    "DEVICE_SCHEMA",
    "DEVICE_STATE_SCHEMA",
    "ERROR_SCHEMA",
    "OUTBOX_SCHEMA",
    "REFUSAL_SCHEMA",
    "UPLINK_SCHEMA",
    "AdminServer",
    "admin_ssl_context",
    "openapi_document",
]

log = structlog.get_logger("edgegw.admin")


class AdminServer(DeviceHandlers):
    def __init__(self, gateway: Gateway, *, writer_task: asyncio.Task[Any] | None = None) -> None:
        self.gateway = gateway
        self.settings = gateway.config.admin
        self.writer_task = writer_task
        self.started_at = time.time()
        self.sampler = Sampler(gateway)
        self.reader = OutboxReader(gateway.config.outbox.path)
        config = gateway.config
        self._cert_paths = {"server": config.tls.cert, "fleet_ca": config.tls.ca, "uplink_client": config.uplink.cert}
        self._certs_read = time.monotonic()
        self.collector = GatewayCollector(gateway, self.sampler, self.reader, certificate_expiry(self._cert_paths))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.router = Router()
        for route in self._routes():
            self.router.add(route)
        self.http = HTTPServer(self.router, allowed_hosts=_allowed_hosts(self.settings.bind))
        self._sampler_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    async def start_for(cls, gateway: Gateway, **kwargs: Any) -> AdminServer | None:
        """Start it if ``admin.enabled``; None when disabled. A port that cannot be bound is logged, not fatal."""
        if not gateway.config.admin.enabled:
            return None
        admin = cls(gateway, **kwargs)
        admin._sampler_task = asyncio.create_task(admin.sampler.run(), name="ops-sampler")
        admin.sampler.sample()
        settings = admin.settings
        context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            try:
                context = admin_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            except (OSError, ssl.SSLError, ValueError) as exc:
                # Never fall back to plain HTTP: without its TLS material the admin server stays off.
                log.error("admin.tls_failed", error=str(exc), cert=str(settings.tls_cert))
                return admin
        try:
            await admin.http.start(settings.bind, settings.port, context)
        except OSError as exc:
            log.error("admin.bind_failed", bind=settings.bind, port=settings.port, error=str(exc))
            return admin
        scheme = "https" if context is not None else "http"
        log.info("admin.listening", bind=settings.bind, port=admin.http.port, tls=context is not None,
                 client_certificates=settings.tls_client_ca is not None,
                 url=f"{scheme}://{_url_host(settings.bind)}:{admin.http.port}/")
        return admin

    @property
    def port(self) -> int:
        return self.http.port

    async def close(self) -> None:
        if self._sampler_task is not None:
            self._sampler_task.cancel()
        await self.http.close()

    # --- the route table (the OpenAPI document is generated from it) --------------------------------------

    def _routes(self) -> list[Route]:
        return [
            Route("GET", "/", self.status_page, "Status page (HTML): devices, rates, outbox chart, uplink, refusals",
                  {200: "HTML page"}, tag="ui", content_type="text/html"),
            Route("GET", "/healthz", self.healthz, "Liveness: the event loop answers",
                  {200: "alive"}, tag="health", response_schema=_OBJ),
            Route("GET", "/readyz", self.readyz, "Readiness: device listener up and outbox writable. The uplink "
                  "is reported but never makes the gateway unready (the outbox buffers while it is down).",
                  {200: "ready", 503: "not ready (see checks)"}, tag="health", response_schema={
                      "type": "object", "required": ["ready", "checks"], "properties": {
                          "ready": {"type": "boolean"}, "checks": {"type": "object"}, "uplink": UPLINK_SCHEMA}}),
            Route("GET", "/metrics", self.metrics, "Prometheus metrics (text exposition format 0.0.4)",
                  {200: "metrics"}, tag="metrics", content_type="text/plain"),
            Route("GET", "/api/stats", self.stats, "Everything the status page shows, in one document",
                  {200: "stats"}, tag="api", response_schema={"type": "object", "properties": {
                      "devices": _schema_list(DEVICE_SCHEMA), "outbox": OUTBOX_SCHEMA, "uplink": UPLINK_SCHEMA,
                      "rates": _OBJ, "history": _schema_list(_OBJ), "refusals": _schema_list(REFUSAL_SCHEMA),
                      "mqtt": _OBJ, "event_loop_lag_seconds": {"type": "number"}}}),
            Route("GET", "/api/devices", self.devices, "Connected device sessions", {200: "devices"}, tag="api",
                  response_schema={"type": "object", "properties": {"devices": _schema_list(DEVICE_SCHEMA),
                                                                    "count": {"type": "integer"}}}),
            Route("POST", "/api/devices/{device_id}/disconnect", self.disconnect,
                  "Close a device's live session (MQTT 5: DISCONNECT 0x98 Administrative action). The device may "
                  "reconnect; revoke or suspend it in the registry to keep it out.",
                  {200: "disconnected", 404: "not connected"}, tag="api",
                  response_schema={"type": "object", "properties": {"device_id": {"type": "string"},
                                                                    "disconnected": {"type": "boolean"}}}),
            Route("POST", "/api/devices/{device_id}/suspend", self.suspend,
                  "Suspend a device in the registry (registry.path): its live session is closed (MQTT 5: DISCONNECT "
                  "0x87 Not authorized) and reconnecting is refused until it is resumed. Optional JSON body "
                  "{\"reason\": \"...\"}, stored in the registry and shown in the refusal.",
                  {200: "suspended (the registry is reloaded; see reloaded and disconnected)",
                   404: "unknown device in the registry", 409: "no registry configured, or the device is revoked"},
                  tag="api", response_schema=DEVICE_STATE_SCHEMA),
            Route("POST", "/api/devices/{device_id}/resume", self.resume,
                  "Resume a suspended device in the registry: it may connect again (an active device stays active)",
                  {200: "active", 404: "unknown device in the registry",
                   409: "no registry configured, or the device is revoked (issue a new certificate instead)"},
                  tag="api", response_schema=DEVICE_STATE_SCHEMA),
            Route("GET", "/api/outbox", self.outbox, "Outbox statistics", {200: "outbox"}, tag="api",
                  response_schema=OUTBOX_SCHEMA),
            Route("GET", "/api/quarantine", self.quarantine, "Records the upstream refused or that could not be "
                  "decoded, newest first (payload sizes only, never payload bytes)",
                  {200: "quarantined records", 503: "outbox database not readable"}, tag="api",
                  response_schema={"type": "object", "properties": {"count": {"type": "integer"},
                                                                    "records": _schema_list(_OBJ)}},
                  query=(("limit", "integer", "at most this many records (1-1000, default 100)"),)),
            Route("POST", "/api/reload", self.reload,
                  "Reload the device-facing TLS material, CRL and registry (as SIGHUP does)",
                  {200: "reloaded", 500: "refused (bad material): the running configuration stays",
                   501: "this build has no reload hook"}, tag="api", response_schema=_OBJ),
            Route("GET", "/asyncapi.json", self.asyncapi, "AsyncAPI 3 document of the device-facing MQTT API, "
                  "from the running config", {200: "AsyncAPI document"}, tag="docs", response_schema=_OBJ),
            Route("GET", "/docs", self.asyncapi_html, "The device-facing API as a page (developer portal)",
                  {200: "HTML page"}, tag="docs", content_type="text/html"),
            Route("GET", "/openapi.json", self.openapi, "This document (OpenAPI 3.1)", {200: "OpenAPI document"},
                  tag="docs", response_schema=_OBJ),
        ]

    # --- health ----------------------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return Response.json({"status": "alive", "uptime_seconds": round(time.time() - self.started_at, 3)})

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        gw = self.gateway
        server = gw.server
        listener = getattr(server, "_server", None)
        listening = bool(listener is not None and listener.is_serving())
        outbox = gw.outbox
        folder = gw.config.outbox.path.parent
        writer_alive = self.writer_task is None or not self.writer_task.done()
        stopping = bool(getattr(outbox, "_stopping", False))
        writable = (outbox is not None and writer_alive and not stopping
                    and os.access(folder, os.W_OK | os.X_OK))
        checks = {
            "mqtt_listener": {"ok": listening, "port": _safe_port(server)},
            "outbox_writable": {"ok": writable, "writer_running": writer_alive, "stopping": stopping,
                                "path": str(gw.config.outbox.path)},
        }
        return listening and writable, checks

    async def readyz(self, request: Request) -> Response:
        ready, checks = self._readiness()
        return Response.json({"ready": ready, "checks": checks, "uplink": self._uplink()}, 200 if ready else 503)

    # --- metrics ---------------------------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        await self.reader.refresh(max_age=1.0)
        if time.monotonic() - self._certs_read > 60.0:  # certificates are renewed and reloaded while we run
            self._certs_read = time.monotonic()
            self.collector.cert_expiry = await asyncio.to_thread(certificate_expiry, self._cert_paths)
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    # --- API -------------------------------------------------------------------------------------------------

    async def _outbox(self) -> dict[str, Any]:
        outbox = self.gateway.outbox
        facts = await self.reader.refresh(max_age=0.5)
        oldest = facts.oldest_received_at
        return {
            "path": str(self.gateway.config.outbox.path),
            "depth": int(_num(outbox, "depth") or 0), "bytes": int(_num(outbox, "bytes_held") or 0),
            "byte_limit": int(_num(outbox, "byte_limit") or 0), "pending": int(_num(outbox, "pending_count") or 0),
            "oldest_age_seconds": round(max(0.0, time.time() - oldest), 3) if oldest is not None else None,
            "commits": int(_num(outbox, "commits") or 0),
            "committed_records": int(_num(outbox, "committed_records") or 0),
            "dropped": dict(getattr(outbox, "dropped", {}) or {}),
            "expired": dict(getattr(outbox, "expired", {}) or {}),
            "rejected": dict(getattr(outbox, "rejected", {}) or {}), "quarantined": facts.quarantine_count,
            "quarantine_dropped": dict(getattr(outbox, "quarantine_dropped", {}) or {}),
        }

    async def outbox(self, request: Request) -> Response:
        return Response.json(await self._outbox())

    async def quarantine(self, request: Request) -> Response:
        limit = int(request.query.get("limit", ["100"])[0])
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be 1-1000")
        try:
            records = await self.reader.quarantine(limit)
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, OSError, timeout: say so
            return Response.error(503, f"cannot read the quarantine: {exc}")
        facts = await self.reader.refresh(max_age=0.0)
        return Response.json({"count": facts.quarantine_count, "records": records})

    async def reload(self, request: Request) -> Response:
        hook = getattr(self.gateway, "reload", None)
        if not callable(hook):
            return Response.error(501, "this gateway has no reload hook: restart it to apply a new config")
        try:
            accepts_trigger = "trigger" in inspect.signature(hook).parameters
        except (TypeError, ValueError):
            accepts_trigger = False
        result = hook(trigger="admin-api") if accepts_trigger else hook()
        if inspect.isawaitable(result):
            result = await result
        if result is False:
            return Response.error(500, "reload refused: the running configuration stays (see the log for why)")
        log.info("admin.reloaded")
        return Response.json({"reloaded": True})

    def _uplink(self) -> dict[str, Any]:
        uplink = self.gateway.uplink
        return {
            "state": getattr(uplink, "state", "down"), "endpoint": getattr(uplink, "endpoint", None),
            "rtt_seconds": _num(uplink, "last_rtt", None), "inflight": int(_num(uplink, "inflight") or 0),
            "sent": int(_num(uplink, "sent") or 0), "acked": int(_num(uplink, "acked") or 0),
            "refused": int(_num(uplink, "refused") or 0), "throttled": int(_num(uplink, "throttled") or 0),
            "backlog": int(_num(uplink, "backlog") or 0),
            "drain_eta_seconds": _num(uplink, "backfill_eta", None),
        }

    async def stats(self, request: Request) -> Response:
        server = self.gateway.server
        stats = getattr(server, "stats", None)
        mqtt = {}
        for name in ("accepted", "connected", "publish_received", "publish_acked", "publish_denied",
                     "publish_rejected", "connect_refused", "handshake_failed", "refused_capacity",
                     "protocol_errors", "takeovers", "downlink_delivered"):
            mqtt[name] = int(_num(stats, name) or 0)
        history = [{"t": round(s.t, 3), "depth": s.depth, "received": s.received, "acked": s.acked}
                   for s in list(self.sampler.history)[-300:]]
        ready, checks = self._readiness()
        return Response.json({
            "gateway_id": self.gateway.config.gateway.id, "time": time.time(),
            "uptime_seconds": round(time.time() - self.started_at, 3), "ready": ready, "checks": checks,
            "devices": self._devices(), "mqtt": mqtt, "outbox": await self._outbox(), "uplink": self._uplink(),
            "rates": {k: round(v, 3) for k, v in self.sampler.rates().items()}, "history": history,
            "refusals": RECENT_REFUSALS.snapshot(50), "refusal_counts": dict(RECENT_REFUSALS.counts),
            "event_loop_lag_seconds": round(self.sampler.lag, 6),
        })

    async def status_page(self, request: Request) -> Response:
        html = resources.files("edgegw.admin").joinpath("status.html").read_bytes()
        return Response(200, html, "text/html; charset=utf-8", headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    def _asyncapi(self, request: Request) -> dict[str, Any]:
        from edgegw.ops.asyncapi import asyncapi_document

        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]") or None
        return asyncapi_document(self.gateway.config, host=host)

    async def asyncapi(self, request: Request) -> Response:
        return Response.json(self._asyncapi(request))

    async def asyncapi_html(self, request: Request) -> Response:
        from edgegw.ops.asyncapi import render_html

        return Response(200, render_html(self._asyncapi(request)).encode(), "text/html; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return Response.json(openapi_document(self.router.routes))


def _safe_port(server: Any) -> int | None:
    try:
        return int(server.port)
    except Exception:  # noqa: BLE001
        return None
