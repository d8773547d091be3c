"""The composition root: builds every stage from the config and runs them in one TaskGroup.

Start order: outbox (opened, writer running) -> uplink -> device listener (after its persistent sessions are
restored) -> the uplink's command subscription. Stop order (SIGTERM/SIGINT): stop
accepting -> stop reading devices and let their in-flight publishes commit and be acknowledged -> close sessions ->
stop the uplink (its last acknowledgements become deletes) -> flush the outbox. Nothing acknowledged to a device is
lost on the way.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from edgegw.admin import AdminServer
from edgegw.coap import CoAPServer
from edgegw.config import Config
from edgegw.errors import ConfigError
from edgegw.mqtt.server import MQTTServer
from edgegw.ops import otel
from edgegw.ops.notify import SystemdNotifier
from edgegw.outbox.store import Outbox
from edgegw.pipeline import control
from edgegw.pipeline.commands import TenantCommands, tenant_lookup
from edgegw.pipeline.poison import FILE as POISON_FILE
from edgegw.pipeline.poison import PoisonStore
from edgegw.pipeline.reload import build_pipeline, reload_config
from edgegw.pipeline.replay import replay_live
from edgegw.pipeline.tenants import safe_tenant
from edgegw.policy.acl import ACL
from edgegw.policy.certattrs import Subjects, attribute_oid, subject_value
from edgegw.policy.limits import Limiter, RegistryClasses, UsageStore
from edgegw.registry.reload import Credentials
from edgegw.runtime import running_loop_name
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
        self.poison: PoisonStore | None = None
        self._replaying: asyncio.Task[None] | None = None
        self._replay_ended = False  # set at stop: a later SIGUSR1 starts nothing
        self.server: MQTTServer | None = None
        self.coap: CoAPServer | None = None
        """The CoAP ingress ([coap] enabled = true), else None."""
        self.limiter: Limiter | None = None
        """Rate limits and quotas ([limits]); reload: ``limiter.replace(new_config.limits)``."""
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
        spans = self.otel = otel.build(config.tracing, config.gateway.id,  # None unless [tracing] exporter is set
                                       config.uplink.topic_prefix)
        outbox = self.outbox = await Outbox.open(config.outbox)
        try:
            server = self.server = MQTTServer(config.mqtt, device_tls, ACL.from_settings(config.acl), outbox,
                                              otel=spans)
            self.credentials.attach(server)  # the registry/CRL authorizer, and reload closes revoked sessions
            # Always built (without rules it admits at once), so a reload can add limits.
            limiter, classes, subjects = _build_limiter(config, server)
            server.limiter = self.limiter = limiter
            # Poison messages (edgegw/pipeline/poison.py) in quarantine.db next to the outbox; opened even without a
            # pipeline, so a reload can add one.
            poison = self.poison = await PoisonStore(control.state_dir(config.outbox.path) / POISON_FILE).open()
            server.pipeline = build_pipeline(config, poison)  # routes/transforms/tenants; None: stored as sent
            control.write_pid(control.state_dir(config.outbox.path))  # for `edgegw reload`
            coap = None
            if config.coap.enabled:  # same TLS context, registry, CRL and ACL as MQTT (docs/COAP.md)
                coap = self.coap = CoAPServer(config.coap, device_tls, ACL.from_settings(config.acl), outbox,
                                              admit=limiter.coap_admit,
                                              pipeline=lambda: server.pipeline,  # the same, also after reload
                                              tls=config.tls)
                self.credentials.attach(coap)
                coap.site.seen = subjects.note_remote  # tenant and tier from a CoAP device's certificate, as MQTT
            # Commands from upstream (uplink.command_topic) go to the devices' sessions (and CoAP observations);
            # "" leaves it unused.
            uplink = self.uplink = Uplink(config.uplink, outbox, client_id=config.uplink_client_id,
                                          ssl_context=uplink_tls, downlink=_downlink(server, coap), otel=spans)
            # The uplink starts before the device listener (the backlog goes up at once), but takes no command
            # before server.start() restored the persistent sessions: one taken earlier found no session, was
            # acknowledged upstream and counted undeliverable (released below).
            uplink.commands_held = True
            # With [tenants]: commands from each tenant's upstream space, to that tenant's devices only.
            uplink.commands = TenantCommands(config.uplink.command_topic, config.uplink.topic_prefix,
                                             lambda: server.pipeline, tenant_lookup(server, coap, subjects))
            if coap is not None:
                # Before the TaskGroup, so a port that cannot be bound stops the start with a ConfigError naming
                # coap.port (inside, it would come out wrapped in an ExceptionGroup). Requests that arrive before
                # the outbox writer runs simply wait for their commit.
                await coap.start()
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(outbox.run(), name="outbox-writer")
                poison_task = tg.create_task(poison.run(), name="pipeline-quarantine")
                uplink_task = tg.create_task(uplink.run(), name="uplink")
                limits_task = tg.create_task(limiter.run(classes), name="limits-upkeep")
                await server.start()
                uplink.release_commands()
                admin = await AdminServer.start_for(self, writer_task=writer)  # None if [admin] enabled = false
                log.info("gateway.ready", gateway_id=config.gateway.id, mqtt_port=server.port,
                         coap_port=coap.port if coap is not None else None,
                         coap_dtls_port=coap.dtls_port if coap is not None else None,
                         outbox_depth=outbox.depth, upstream=f"{config.uplink.host}:{config.uplink.port}",
                         event_loop=running_loop_name())  # gateway.event_loop "auto" may have fallen back
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
                # What start built lives as long as the process: out of the collector's passes, which otherwise walk
                # it again and again while messages flow (a full pass over every module, config and certificate).
                gc.freeze()
                watchdog = tg.create_task(self.notifier.watchdog(self.status_line), name="watchdog")
                watcher = tg.create_task(self.credentials.watch(), name="credentials-watch")
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=draining")
                log.info("gateway.stopping", connections=server.connection_count, outbox_depth=outbox.depth)
                if coap is not None:
                    coap.stop_accepting()  # no new device while MQTT drains; then CoAP's own in-flight commits
                # One drain budget for both ingresses, so a stop stays within DRAIN_TIMEOUT (+ the writer's last
                # commit) whatever each of them waits for.
                drain_until = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
                await server.drain(DRAIN_TIMEOUT)
                if coap is not None:
                    await coap.drain(max(0.5, drain_until - asyncio.get_running_loop().time()))
                await self._end_replay()  # before the quarantine writer and the outbox it uses
                poison.stop()  # devices are drained: what they sent is committed, the quarantine writer can end
                await poison_task
                # The uplink stops before the outbox writer does, so every upstream PUBACK that arrived is turned
                # into a delete that the writer's last commit still carries (else: duplicates after a restart).
                uplink_task.cancel()
                await asyncio.wait({uplink_task})
                limits_task.cancel()  # devices are gone: the last quota usage is written now
                await asyncio.wait({limits_task})
                await limiter.close()
                outbox.stop()
                await writer
                watchdog.cancel()
                watcher.cancel()
                if admin is not None:
                    await admin.close()
        finally:
            control.remove_pid(control.state_dir(config.outbox.path))
            await self._end_replay()  # also when the TaskGroup failed: never a replay on a closed file
            if self.poison is not None:
                await self.poison.close()
            await outbox.close()
            if spans is not None:  # flush the spans still batched (blocking HTTP: off the event loop)
                await asyncio.to_thread(spans.shutdown)
        log.info("gateway.stopped", outbox_depth=outbox.depth)

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Re-read the config (ACLs, routes, transforms, limits; all or nothing: edgegw/pipeline/reload.py), then
        server certificate/key, CA bundle, CRL and registry; sessions stay unless no longer allowed."""
        if self.server is None:
            return False
        error = reload_config(self, trigger)
        ok = self.credentials.reload(trigger)
        if error is None and not ok:
            error = "TLS material or registry refused (see tls.reload_failed)"
        control.write_result(control.state_dir(self.config.outbox.path), trigger=trigger, ok=error is None,
                             error=error)
        return error is None

    def replay(self) -> None:
        """SIGUSR1 (``edgegw quarantine replay`` while running): poison messages back through the pipeline."""
        if (self.server is None or self._replay_ended
                or (self._replaying is not None and not self._replaying.done())):
            return
        self._replaying = asyncio.get_running_loop().create_task(
            replay_live(self, control.state_dir(self.config.outbox.path)), name="quarantine-replay")

    async def _end_replay(self) -> None:
        """Cancel and await a SIGUSR1 replay (a task outside the TaskGroup: a signal may start it at any time)."""
        self._replay_ended = True
        replaying, self._replaying = self._replaying, None
        if replaying is not None:
            replaying.cancel()
            await asyncio.wait({replaying})

    def status_line(self) -> str:
        devices = len(self.server.devices) if self.server else 0
        depth = self.outbox.depth if self.outbox else 0
        uplink = self.uplink.state if self.uplink else "down"
        return f"{devices} devices connected, outbox depth {depth}, uplink {uplink}"


def _downlink(server: MQTTServer, coap: CoAPServer | None) -> Callable[..., bool]:
    """A command goes to the device's MQTT subscriptions and CoAP observations alike (both may match)."""
    if coap is None:
        return server.deliver_downlink

    def deliver(*args: Any, **kwargs: Any) -> bool:
        delivered = server.deliver_downlink(*args, **kwargs)
        return coap.deliver_downlink(*args, **kwargs) or delivered
    return deliver


def _build_limiter(config: Config, server: MQTTServer) -> tuple[Limiter, RegistryClasses, Subjects]:
    """The limiter with this day's and month's quota usage, the registry's groups/tenants (blocking: at start), and
    the certificate subjects devices presented (what CoAP notes for the limiter)."""
    classes = RegistryClasses(config.registry.path)
    snapshot = classes.read_if_changed()
    if snapshot is not None:
        classes.install(snapshot)

    subjects = Subjects()

    def classify(device_id: str) -> tuple[str, str]:
        # Asked once per device state (first message, after a reload or a registry change), not per message.
        # The certificate is the one the device last presented on any ingress: its live MQTT connection, or
        # noted by the CoAP site (coaps+tcp and DTLS) before the limiter is asked. The group (tier) is the
        # certificate's attribute when limits.group_source names one, else the registry's; the tenant is the
        # pipeline's when [tenants] is configured (registry or certificate), else the registry's.
        group, tenant = classes(device_id)
        proto = server.devices.get(device_id)
        if proto is not None and proto.identity is not None:
            subjects.note(device_id, proto.identity.serial, proto._peercert)
        if device_id in subjects:
            oid = attribute_oid("limits.group_source", limiter.settings.group_source)
            if oid is not None:
                group = safe_tenant(subject_value(subjects.peercert(device_id), oid)) or group
            pipeline = server.pipeline
            if pipeline is not None:
                tenant = pipeline.tenants.tenant(device_id, subjects.serial(device_id),
                                                 lambda: subjects.peercert(device_id)) or tenant
        elif server.pipeline is not None and server.pipeline.tenants.source == "registry":
            tenant = server.pipeline.tenants.tenant(device_id, "", None) or tenant
        return group, tenant

    usage_path = config.limits.usage_path or config.outbox.path.with_name("usage.db")
    limiter = Limiter(config.limits, classify=classify, store=UsageStore(usage_path))
    subjects.on_change = limiter.reclassify  # a device's new certificate may put it in another group or tenant
    limiter.load_usage()
    return limiter, classes, subjects


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
    loop.add_signal_handler(signal.SIGUSR1, gateway.replay)  # edgegw/pipeline/replay.py
    try:
        await gateway.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
