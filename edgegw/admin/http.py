"""A deliberately small HTTP/1.1 server on asyncio streams: one request per connection, then close.

Why not aiohttp: the admin surface is a dozen GET/POST routes for a local scraper, a CLI and one page polling once
a second. A 200-line server with hard limits (head size, body size, read timeout, concurrent connections) is easier
to audit on a security-relevant box than a framework and its dependency tree (aiohttp pulls multidict, yarl,
frozenlist, aiosignal, propcache...), and it keeps the gateway's install small.

Limits: request head 16 KiB, body 64 KiB, 10 s to read a request, 64 connections at once; no keep-alive, no chunked
request bodies (Content-Length only). Anything else gets 400/411/413/431 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

log = structlog.get_logger("edgegw.admin")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 64

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
           415: "Unsupported Media Type", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value, sort_keys=True, default=str).encode(), "application/json")

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"error": message, "status": status}, status)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    """``/api/devices/{device_id}/disconnect``: ``{name}`` matches one path segment."""
    handler: Handler
    summary: str
    responses: dict[int, str]
    """Status code -> description (for the OpenAPI document)."""
    tag: str = "admin"
    response_schema: dict[str, Any] | None = None
    content_type: str = "application/json"
    query: tuple[tuple[str, str, str], ...] = ()
    """(name, type, description) of query parameters."""

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.pattern)) + "$")


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, route: Route) -> None:
        self.routes.append(route)

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, params, path_known): path_known is True if the path exists for some other method."""
        known = False
        for route in self.routes:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {k: unquote(v) for k, v in m.groupdict().items()}, True
            known = True
        return None, {}, known


class HTTPServer:
    def __init__(self, router: Router, *, allowed_hosts: frozenset[str] | None = None) -> None:
        self.router = router
        self.allowed_hosts = allowed_hosts
        """Host header names accepted (None: any). On loopback this stops DNS-rebinding pages from reading us."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        tls: dict[str, Any] = {"ssl": ssl_context, "ssl_handshake_timeout": READ_TIMEOUT} if ssl_context else {}
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True, limit=MAX_HEAD,
                                                  **tls)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._active += 1
        method = "-"
        try:
            if self._active > MAX_CONNECTIONS:
                await self._write(writer, Response.error(503, "too many admin connections"), "GET")
                return
            try:
                request = await asyncio.wait_for(self._read(reader), READ_TIMEOUT)
            except TimeoutError:
                await self._write(writer, Response.error(408, "request not received in time"), "GET")
                return
            if isinstance(request, Response):
                await self._write(writer, request, "GET")
                return
            method = request.method
            response = await self._dispatch(request)
            await self._write(writer, response, method)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._active -= 1
            self._tasks.discard(task)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Request | Response:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Response.error(431, f"request head over {MAX_HEAD} bytes")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            return Response.error(400, "incomplete request head")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response.error(400, "malformed request line")
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return Response.error(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            return Response.error(411, "chunked request bodies are not supported: send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            return Response.error(400, "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            return Response.error(413, f"request body over {MAX_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        return Request(method.upper(), url.path or "/", parse_qs(url.query), headers, body)

    async def _dispatch(self, request: Request) -> Response:
        if self.allowed_hosts is not None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]").lower() not in self.allowed_hosts:
                return Response.error(403, f"Host {host!r} not allowed (the admin server is bound to loopback)")
        route, params, known = self.router.match(request.method, request.path)
        if route is None:
            if known:
                return Response.error(405, f"{request.method} not allowed on {request.path}")
            return Response.error(404, f"no such resource: {request.path}")
        if route.method == "POST" and request.body:
            # A cross-site form can POST text/plain or form data to localhost; it cannot send JSON without a CORS
            # preflight, which we never answer. So a body must be JSON.
            if not request.headers.get("content-type", "").startswith("application/json"):
                return Response.error(415, "POST bodies must be application/json")
        if route.method == "POST" and request.headers.get("origin") not in (None, "null") \
                and self.allowed_hosts is not None:
            origin_host = urlsplit(request.headers["origin"]).hostname or ""
            if origin_host.lower() not in self.allowed_hosts:
                return Response.error(403, "cross-origin POST refused")
        request.params = params
        try:
            return await route.handler(request)
        except (ValueError, KeyError) as exc:
            return Response.error(400, f"bad request: {exc}")
        except Exception as exc:  # noqa: BLE001 - an admin bug must not take the gateway down
            log.error("admin.handler_failed", path=request.path, error=repr(exc))
            return Response.error(500, "internal error (logged as admin.handler_failed)")

    async def _write(self, writer: asyncio.StreamWriter, response: Response, method: str) -> None:
        reason = REASONS.get(response.status, "Unknown")
        headers = {"Content-Type": response.content_type, "Content-Length": str(len(response.body)),
                   "Connection": "close", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                   **response.headers}
        head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode("latin-1") + b"\r\n" + (b"" if method == "HEAD" else response.body))
        await writer.drain()
