"""The device routes of the admin API: list the connected sessions, disconnect one, suspend or resume a device in
the registry (then reload it, so the gateway acts at once). Mixed into :class:`~edgegw.admin.app.AdminServer`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from edgegw.admin.http import Request, Response
from edgegw.ops.metrics import _num, protocol_version

if TYPE_CHECKING:
    from edgegw.daemon import Gateway

log = structlog.get_logger("edgegw.admin")


class DeviceHandlers:
    """Mixed into :class:`~edgegw.admin.app.AdminServer`; its handlers are named in ``AdminServer._routes``."""

    gateway: Gateway

    def _devices(self) -> list[dict[str, Any]]:
        server = self.gateway.server
        loop_now = asyncio.get_running_loop().time()
        out = []
        for key, proto in sorted((getattr(server, "devices", None) or {}).items()):
            accepted = getattr(proto, "_accepted_at", None)
            engine = getattr(proto, "engine", None)
            out.append({
                "device_id": str(getattr(proto, "device_id", None) or key), "session_key": str(key),
                "peer": str(getattr(proto, "peer", "")), "protocol": "mqtt", "version": protocol_version(proto),
                "lab": bool(getattr(proto, "lab", False)),
                "connected_seconds": round(loop_now - accepted, 3) if isinstance(accepted, float) else None,
                "inflight": int(_num(engine, "inflight") or 0), "keepalive": int(_num(engine, "keepalive") or 0),
            })
        return out

    async def devices(self, request: Request) -> Response:
        devices = self._devices()
        return Response.json({"count": len(devices), "devices": devices})

    async def disconnect(self, request: Request) -> Response:
        from edgegw.mqtt.packets import ReasonCode

        device_id = request.params["device_id"]
        server = self.gateway.server
        done = bool(server is not None and server.disconnect_device(
            device_id, ReasonCode.ADMINISTRATIVE_ACTION, "disconnected by the admin API"))
        if not done:
            return Response.error(404, f"device {device_id!r} is not connected")
        log.info("admin.device_disconnected", device_id=device_id)
        return Response.json({"device_id": device_id, "disconnected": True})

    async def suspend(self, request: Request) -> Response:
        body = request.json()
        reason = body.get("reason", "") if isinstance(body, dict) else ""
        if not isinstance(reason, str):
            raise ValueError("reason must be a string")
        return await self._set_state(request.params["device_id"], "suspended", reason[:500])

    async def resume(self, request: Request) -> Response:
        return await self._set_state(request.params["device_id"], "active", "")

    async def _set_state(self, device_id: str, target: str, reason: str) -> Response:
        """Suspend or resume in the registry (a worker thread: SQLite may wait for `pki batch`'s lock), then
        reload it so the gateway acts at once (suspend: the live session is closed by the reload)."""
        from edgegw.mqtt.packets import ReasonCode
        from edgegw.registry import DeviceState, Registry, RegistryError

        path = self.gateway.config.registry.path
        if path is None:
            return Response.error(409, "no device registry configured (registry.path)")

        def change() -> tuple[str, str] | str:
            with Registry.open(path, create=False) as registry:
                device = registry.find(device_id)
                if device is None:
                    return "unknown"
                if device.state is DeviceState.REVOKED:
                    return "revoked"
                if str(device.state) == target:
                    return target, target
                _, before = registry.set_state(device_id, DeviceState(target), reason)
                return target, str(before)

        try:
            outcome = await asyncio.to_thread(change)
        except RegistryError as exc:
            return Response.error(409, str(exc))
        if outcome == "unknown":
            return Response.error(404, f"device {device_id!r} is not in the registry")
        if outcome == "revoked":
            return Response.error(409, f"device {device_id!r} is revoked: issue a new certificate to bring it back")
        state, previous = outcome
        server = self.gateway.server
        was_live = server is not None and device_id in (getattr(server, "devices", None) or {})
        hook = getattr(self.gateway, "reload", None)
        reloaded = bool(hook(trigger="admin-api") if callable(hook) else False)
        if target == "suspended" and was_live and server is not None:
            # The reload closed the session (0x87); if it was refused (bad TLS material) this closes it (no-op else).
            server.disconnect_device(device_id, ReasonCode.NOT_AUTHORIZED, "device is suspended (admin API)")
        disconnected = target == "suspended" and was_live
        log.info("admin.device_" + ("suspended" if target == "suspended" else "resumed"), device_id=device_id,
                 previous_state=previous, reason=reason or None, reloaded=reloaded)
        return Response.json({"device_id": device_id, "state": state, "previous_state": previous,
                              "reason": reason, "reloaded": reloaded,
                              **({"disconnected": disconnected} if target == "suspended" else {})})
