"""/readyz follows the listener and the outbox writer; the uplink never makes the gateway unready (in-process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgegw.admin import AdminServer
from edgegw.config import config_from_mapping


def _config(tmp_path: Path) -> Any:
    return config_from_mapping({
        "tls": {"cert": "c.crt", "key": "c.key", "ca": "ca.crt"},
        "uplink": {"host": "127.0.0.1", "ca": "ca.crt", "cert": "u.crt", "key": "u.key"},
        "outbox": {"path": "state/outbox.db"},
        "admin": {"port": 0},
    }, base_dir=tmp_path)


async def _get(port: int, path: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_readyz_follows_listener_and_outbox_writer(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "state").mkdir()
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    writer_task = asyncio.create_task(asyncio.sleep(3600))
    gateway = SimpleNamespace(
        config=config,
        server=SimpleNamespace(_server=listener, port=listener.sockets[0].getsockname()[1], devices={},
                               stats=SimpleNamespace()),
        outbox=SimpleNamespace(depth=0, _stopping=False),
        uplink=SimpleNamespace(state="down"),  # the cloud is away: still ready
    )
    admin = await AdminServer.start_for(gateway, writer_task=writer_task)  # type: ignore[arg-type]
    assert admin is not None
    try:
        status, body = await _get(admin.port, "/readyz")
        assert status == 200 and body["ready"] is True and body["uplink"]["state"] == "down"
        # The outbox writer died: not ready, and the check says which.
        writer_task.cancel()
        await asyncio.sleep(0)
        status, body = await _get(admin.port, "/readyz")
        assert status == 503 and body["checks"]["outbox_writable"]["writer_running"] is False
        # Draining: the listener is closed.
        writer_task = asyncio.create_task(asyncio.sleep(3600))
        admin.writer_task = writer_task
        listener.close()
        status, body = await _get(admin.port, "/readyz")
        assert status == 503 and body["checks"]["mqtt_listener"]["ok"] is False
        status, body = await _get(admin.port, "/healthz")
        assert status == 200  # alive all along
        # /metrics survives objects that lack every counter it looks for.
        reader, w = await asyncio.open_connection("127.0.0.1", admin.port)
        w.write(f"GET /metrics HTTP/1.1\r\nHost: localhost:{admin.port}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        w.close()
        assert data.startswith(b"HTTP/1.1 200") and b"edgegw_uplink_state{state=\"down\"} 1.0" in data
    finally:
        writer_task.cancel()
        await admin.close()


async def test_http_limits_refuse_malformed_and_oversized_requests(tmp_path: Path) -> None:
    config = _config(tmp_path)
    gateway = SimpleNamespace(config=config, server=None, outbox=None, uplink=None)
    admin = await AdminServer.start_for(gateway)  # type: ignore[arg-type]
    assert admin is not None

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        writer.write(data)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return out

    try:
        assert (await raw(b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await raw(b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")).startswith(b"HTTP/1.1 431")
        assert (await raw(b"POST /api/reload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
                ).startswith(b"HTTP/1.1 411")
        # No gateway parts at all (still starting): health answers, readiness says no, the API does not crash.
        assert (await raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert (await raw(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")).startswith(b"HTTP/1.1 503")
        assert (await raw(b"GET /api/devices HTTP/1.1\r\nHost: localhost\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert (await raw(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await admin.close()
