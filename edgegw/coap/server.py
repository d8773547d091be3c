"""The CoAP ingress as one part of the gateway: an aiocoap Context, its site, its listeners, start and stop.

- coaps+tcp (:mod:`edgegw.coap.tls_listener`) on ``coap.bind:coap.port``: client certificate required, verified
  against the fleet CA and CRL by the ``[tls]`` context that the MQTT listener uses (replaced on reload through
  :attr:`CoAPServer.ssl_context`), identity = certificate CN, registry verdict per connection (``authorizer``).
- lab (``coap.lab = true`` only): plain CoAP over UDP on ``coap.lab_bind:coap.lab_port``, NO authentication, the
  device id taken from the request's ``c=`` query (EMQX's convention), logged loudly at start. Its socket gets
  ``coap.receive_buffer`` (SO_RCVBUF) and its message-id cache ``coap.exchange_lifetime``.
- DTLS (``coap.dtls = true``): :mod:`edgegw.coap.dtls` on UDP ``coap.bind:coap.dtls_port``, the same site, its
  remotes carry ``device_identity`` like ours; its OpenSSL material is rebuilt from ``[tls]`` on every successful
  reload (when the SSLContext is handed in) and its sessions revalidated. pyOpenSSL is imported only then.

Downlink: :meth:`deliver_downlink` has the signature of ``MQTTServer.deliver_downlink`` so the daemon can hand a
command from upstream to both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from aiocoap import Context
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.constants import TransportTuning
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

from edgegw.config import CoAPSettings, TLSSettings
from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity
from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL

from ._fastpath import PublishTokenManager
from .site import Admit, CoAPStats, PipelineOf, PubSubSite, always_admit
from .tls_listener import TLSListener, TLSListenerStats

log = structlog.get_logger("edgegw.coap")

Authorizer = Callable[[DeviceIdentity], "str | None"]
_AIOCOAP_LOGGER = "edgegw.coap.aiocoap"


class CoAPServer:
    def __init__(self, settings: CoAPSettings, ssl_context: ssl.SSLContext, acl: ACL, outbox: Outbox, *,
                 admit: Admit = always_admit, authorizer: Authorizer | None = None,
                 pipeline: PipelineOf = lambda: None, tls: TLSSettings | None = None) -> None:
        self.settings = settings
        self.tls = tls
        """The [tls] files, for the DTLS transport's own (pyOpenSSL) context; needed when ``coap.dtls``."""
        self._ssl_context = ssl_context
        self._authorizer = authorizer
        self.site = PubSubSite(settings, outbox, acl, admit=admit, authorizer=authorizer, is_lab=self._is_lab,
                               pipeline=pipeline)
        self.context: Context | None = None
        self.listener: TLSListener | None = None
        self._lab: MessageInterfaceUDP6 | None = None
        self.dtls: Any = None
        """The :class:`edgegw.coap.dtls.DTLSServer` when ``coap.dtls``, else None."""

    # --- what Credentials (edgegw/registry/reload.py) sets and calls ------------------------------------------

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext) -> None:
        self._ssl_context = context
        if self.listener is not None:
            self.listener.ssl_context = context
        if self.dtls is not None and self.tls is not None:  # a reload: the files loaded, rebuild DTLS's context too
            from edgegw.coap.dtls import DTLSMaterial
            try:
                self.dtls.replace_material(DTLSMaterial.from_tls(self.tls))
            except ConfigError as exc:
                log.error("dtls.reload_failed", reason=str(exc), key=exc.key, kept="the running DTLS material")

    @property
    def authorizer(self) -> Authorizer | None:
        return self._authorizer

    @authorizer.setter
    def authorizer(self, authorizer: Authorizer | None) -> None:
        self._authorizer = authorizer
        self.site.authorizer = authorizer
        if self.listener is not None:
            self.listener.authorizer = authorizer

    def close_refused(self, authorize: Authorizer) -> list[str]:
        """Close the connections (and DTLS sessions) of devices that ``authorize`` now refuses; their ids."""
        closed = self.listener.close_refused(authorize) if self.listener is not None else []
        if self.dtls is not None:
            closed += self.dtls.revalidate()
        return closed

    # --- start ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; a port that cannot be bound is a ConfigError naming its key (``coap.port``, ...)."""
        loop = asyncio.get_running_loop()
        # aiocoap logs through this stdlib logger, a warning per misbehaving peer ("Aborting connection"), past
        # our per-event rate limit: those are logged here as coap.protocol_error; keep only its errors.
        logging.getLogger(_AIOCOAP_LOGGER).setLevel(logging.ERROR)
        context = self.context = Context(loop=loop, serversite=self.site, loggername=_AIOCOAP_LOGGER)
        settings = self.settings
        with _names_key("coap.port", settings.bind, settings.port):
            await self.add_interface(lambda tman: TLSListener.start(tman, settings, self._ssl_context, context.log,
                                                                    self._authorizer))
        self.listener = context.request_interfaces[-1].token_interface
        log.info("coap.listening", transport="coaps+tcp", bind=self.settings.bind, port=self.port,
                 max_connections=self.settings.max_connections, max_payload=self.settings.max_payload)
        if settings.lab:
            with _names_key("coap.lab_port", settings.lab_bind, settings.lab_port):
                await self._start_lab(context)
        if settings.dtls:
            with _names_key("coap.dtls_port", settings.bind, settings.dtls_port):
                await self._start_dtls(context)

    async def add_interface(self, make: Callable[[TokenManager], Awaitable[Any]]) -> None:
        """Add a token interface (a transport without message layer: TCP, TLS; or one built on a
        MessageManager by the caller) to this Context, serving the same site."""
        assert self.context is not None
        tman = PublishTokenManager(self.context, self.site)
        tman.token_interface = await make(tman)
        self.context.request_interfaces.append(tman)

    async def _start_lab(self, context: Context) -> None:
        settings = self.settings
        tman = PublishTokenManager(context, self.site)
        mman = _LabMessageManager(tman, settings.exchange_lifetime)
        interface = await MessageInterfaceUDP6.create_server_transport_endpoint(
            mman, log=context.log, loop=asyncio.get_running_loop(), bind=(settings.lab_bind, settings.lab_port),
            multicast=[])
        mman.message_interface = interface
        tman.token_interface = mman
        context.request_interfaces.append(tman)
        self._lab = interface
        sock = interface.transport.get_extra_info("socket")
        got = _set_rcvbuf(sock, settings.receive_buffer)
        log.warning("coap.lab_listener_open", bind=settings.lab_bind, port=self.lab_port, receive_buffer=got,
                    danger="PLAIN CoAP OVER UDP, NO AUTHENTICATION: the ?c= query is the device id. For firmware "
                           "bring-up only, never production.")

    async def _start_dtls(self, context: Context) -> None:
        from edgegw.coap.dtls import DTLSLimits, DTLSMaterial, start_dtls_server

        settings = self.settings
        if self.tls is None:
            raise ConfigError("coap.dtls", "needs the [tls] material (CoAPServer(tls=...))")
        limits = DTLSLimits(max_sessions=settings.dtls_max_sessions,
                            handshakes_per_second=settings.dtls_handshakes_per_second,
                            handshake_burst=max(1, int(settings.dtls_handshakes_per_second)),
                            handshake_timeout=settings.handshake_timeout, idle_timeout=settings.dtls_idle_timeout,
                            rcvbuf=settings.receive_buffer, exchange_lifetime=settings.exchange_lifetime,
                            max_inflight=settings.max_inflight)
        # authorize through self: Credentials.attach sets the authorizer after construction, reloads keep it.
        self.dtls = await start_dtls_server(context, host=settings.bind, port=settings.dtls_port,
                                            material=DTLSMaterial.from_tls(self.tls), limits=limits,
                                            authorize=self._authorize,
                                            token_manager=lambda ctx: PublishTokenManager(ctx, self.site))

    def _authorize(self, identity: DeviceIdentity) -> str | None:
        return self._authorizer(identity) if self._authorizer is not None else None

    @property
    def dtls_port(self) -> int | None:
        return int(self.dtls.address[1]) if self.dtls is not None else None

    def _is_lab(self, remote: Any) -> bool:
        return self._lab is not None and isinstance(remote, UDP6EndpointAddress) and remote.interface is self._lab

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    @property
    def lab_port(self) -> int | None:
        if self._lab is None:
            return None
        return int(self._lab.transport.get_extra_info("socket").getsockname()[1])

    @property
    def stats(self) -> CoAPStats:
        return self.site.stats

    @property
    def connection_stats(self) -> TLSListenerStats | None:
        return self.listener.stats if self.listener is not None else None

    @property
    def connection_count(self) -> int:
        return len(self.listener._pool) if self.listener is not None else 0

    # --- downlink ------------------------------------------------------------------------------------------

    def deliver_downlink(self, device_id: str, topic: str, payload: bytes, qos: int,
                         properties: Properties = NO_PROPERTIES, *, message_expiry: int | None = None) -> bool:
        """A command from upstream to ``device_id``'s observations matching ``topic`` (``devices/{id}/...``).
        True if one matched. Not queued for a device that is not observing (CoAP has no sessions)."""
        content_type = properties.values.get(PropertyId.CONTENT_TYPE) if properties else None
        return self.site.deliver(device_id, topic, payload, content_type if isinstance(content_type, str) else None)

    # --- stop ----------------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.stop_accepting()

    @property
    def inflight(self) -> int:
        """Reliable requests awaiting their commit: coaps+tcp connections and DTLS sessions."""
        return ((self.listener.inflight if self.listener is not None else 0)
                + (self.dtls.inflight if self.dtls is not None else 0))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, stop reading, wait (bounded) until requests awaiting their commit are answered, then
        close everything. The outbox writer must still be running while this waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        listener = self.listener
        if listener is not None:
            listener.stop_accepting()
            listener.pause_all()
        if self.dtls is not None:
            self.dtls.stop_reading()  # UDP: new handshakes and requests are dropped; the devices' ACKs still pass
        # DTLS publishes too: closing their sessions before the commit answers them means a resend, a duplicate.
        # A DTLS answer may also still be queued behind another one the device has not ACKed yet (NSTART = 1).
        while (self.inflight or (self.dtls is not None and self.dtls.queued)) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.context is not None:
            # aiocoap's shutdown closes every transport; bounded, so one that hangs cannot hold the stop past the
            # drain budget (whatever is still open is closed with the process).
            try:
                await asyncio.wait_for(self.context.shutdown(), max(0.5, deadline - loop.time()))
            except TimeoutError:
                log.warning("coap.shutdown_timeout", timeout=timeout, inflight=self.inflight)
        log.info("coap.stopped", published=self.site.stats.published, refused=self.site.stats.refused)


def _set_rcvbuf(sock: Any, size: int) -> int:
    """SO_RCVBUFFORCE (root / CAP_NET_ADMIN: past net.core.rmem_max), else SO_RCVBUF; the size the kernel grants
    (Linux reports twice the request). aiocoap never sets it: most of a burst of datagrams is dropped (BRIEF §2)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    if got < size:
        log.warning("coap.rcvbuf_capped", asked=size, got=got, hint="raise net.core.rmem_max")
    return got


@contextmanager
def _names_key(key: str, host: str, port: int) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class _LabTuning(TransportTuning):
    def __init__(self, exchange_lifetime: float) -> None:
        self._exchange_lifetime = exchange_lifetime

    @property
    def EXCHANGE_LIFETIME(self) -> float:  # noqa: N802 - aiocoap's name
        return self._exchange_lifetime


class _LabMessageManager(MessageManager):
    """aiocoap's UDP message layer keeps every message id for EXCHANGE_LIFETIME (247 s, ~2.3 KB each: GBs under
    load, BRIEF §2); incoming messages get ours instead."""

    def __init__(self, token_manager: TokenManager, exchange_lifetime: float) -> None:
        super().__init__(token_manager)
        self._tuning = _LabTuning(exchange_lifetime)

    def dispatch_message(self, message: Any) -> None:
        message.transport_tuning = self._tuning
        super().dispatch_message(message)
