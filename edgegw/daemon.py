"""The composition root: builds every stage from the config and runs them in one TaskGroup.

Start order: outbox (opened, writer running) -> uplink -> device listener. Stop order (SIGTERM/SIGINT): stop
accepting -> stop reading devices and let their in-flight publishes commit and be acknowledged -> close sessions ->
stop the uplink (its last acknowledgements become deletes) -> flush the outbox. Nothing acknowledged to a device is
lost on the way.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable

import structlog

from edgegw.admin import AdminServer
from edgegw.config import Config
from edgegw.errors import ConfigError
from edgegw.mqtt.server import MQTTServer
from edgegw.ops import otel
from edgegw.ops.notify import SystemdNotifier
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL
from edgegw.registry.reload import Credentials
from edgegw.tlsutil import client_ssl_context
from edgegw.uplink.paho_bridge import Uplink

log = structlog.get_logger("edgegw.daemon")

DRAIN_TIMEOUT = 10.0


class Gateway:
    """One running gateway. Parts are exposed for the demo, tests and (later) the admin API."""

    def __init__(self, config: Config, notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or SystemdNotifier(environ={})
        self.outbox: Outbox | None = None
        self.server: MQTTServer | None = None
        self.uplink: Uplink | None = None
        self.otel: otel.Spans | None = None
        """OpenTelemetry span export ([tracing]); None when off (the default)."""
        self.credentials = Credentials(config.tls, config.registry)
        """Device-facing TLS material, CRL and registry; reloaded on SIGHUP / file change (edgegw/registry/reload.py)."""

    async def run(self, stop: asyncio.Event, on_ready: Callable[[Gateway], None] | None = None) -> None:
        config = self.config
        device_tls = _load_tls("tls", self.credentials.load)
        uplink_tls = _load_tls("uplink", lambda: client_ssl_context(
            config.uplink.ca, config.uplink.cert, config.uplink.key))
        spans = self.otel = otel.build(config.tracing, config.gateway.id)  # None unless [tracing] exporter is set
        outbox = self.outbox = await Outbox.open(config.outbox)
        try:
            server = self.server = MQTTServer(config.mqtt, device_tls, ACL.from_settings(config.acl), outbox,
                                              otel=spans)
            self.credentials.attach(server)  # the registry/CRL authorizer, and reload closes revoked sessions
            # Commands from upstream (uplink.command_topic) go to the devices' sessions; "" leaves it unused.
            uplink = self.uplink = Uplink(config.uplink, outbox, client_id=config.uplink_client_id,
                                          ssl_context=uplink_tls, downlink=server.deliver_downlink, otel=spans)
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(outbox.run(), name="outbox-writer")
                uplink_task = tg.create_task(uplink.run(), name="uplink")
                await server.start()
                admin = await AdminServer.start_for(self, writer_task=writer)  # None if [admin] enabled = false
                log.info("gateway.ready", gateway_id=config.gateway.id, mqtt_port=server.port,
                         outbox_depth=outbox.depth, upstream=f"{config.uplink.host}:{config.uplink.port}")
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
                watchdog = tg.create_task(self.notifier.watchdog(self.status_line), name="watchdog")
                watcher = tg.create_task(self.credentials.watch(), name="credentials-watch")
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=draining")
                log.info("gateway.stopping", connections=server.connection_count, outbox_depth=outbox.depth)
                await server.drain(DRAIN_TIMEOUT)
                # The uplink stops before the outbox writer does, so every upstream PUBACK that arrived is turned
                # into a delete that the writer's last commit still carries (else: duplicates after a restart).
                uplink_task.cancel()
                await asyncio.wait({uplink_task})
                outbox.stop()
                await writer
                watchdog.cancel()
                watcher.cancel()
                if admin is not None:
                    await admin.close()
        finally:
            await outbox.close()
            if spans is not None:  # flush the spans still batched (blocking HTTP: off the event loop)
                await asyncio.to_thread(spans.shutdown)
        log.info("gateway.stopped", outbox_depth=outbox.depth)

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Re-read server certificate/key, CA bundle, CRL and registry; sessions stay unless no longer allowed."""
        return self.credentials.reload(trigger) if self.server is not None else False

    def status_line(self) -> str:
        devices = len(self.server.devices) if self.server else 0
        depth = self.outbox.depth if self.outbox else 0
        uplink = self.uplink.state if self.uplink else "down"
        return f"{devices} devices connected, outbox depth {depth}, uplink {uplink}"


def _load_tls(section: str, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    try:
        return build()
    except FileNotFoundError as exc:
        raise ConfigError(section, f"certificate material not found: {exc.filename}") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(section, f"cannot load certificate material: {exc}") from None


async def run_until_signalled(config: Config) -> None:
    """Run the gateway in the foreground until SIGTERM or SIGINT; SIGHUP reloads the device-facing credentials."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gateway = Gateway(config, SystemdNotifier())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    try:
        await gateway.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
