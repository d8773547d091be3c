"""The pieces of the DTLS transport that aiocoap sees (remote, message interface, tuning) and its limits and counters.

Split from ``dtls.py`` so the server shell stays one screenful of I/O logic; everything public is re-exported there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields
from typing import Any, Protocol

from aiocoap import interfaces
from aiocoap.message import Message
from aiocoap.numbers.constants import MAX_REGULAR_BLOCK_SIZE_EXP, TransportTuning
from aiocoap.util import hostportjoin
from OpenSSL import SSL

from edgegw.errors import ConfigError
from edgegw.identity import DeviceIdentity


class _Owner(Protocol):
    hostinfo_local: str
    limits: DTLSLimits
    inflight: int

    def _send_app(self, session: Session, data: bytes) -> None: ...

    def detach(self) -> None: ...

    async def close(self) -> None: ...


class ExchangeTuning(TransportTuning):
    """aiocoap's defaults but for EXCHANGE_LIFETIME, set on every incoming message (as the lab UDP listener)."""

    def __init__(self, exchange_lifetime: float) -> None:
        self._exchange_lifetime = exchange_lifetime

    @property
    def EXCHANGE_LIFETIME(self) -> float:  # noqa: N802 - aiocoap's name
        return self._exchange_lifetime


@dataclass(frozen=True, slots=True, kw_only=True)
class DTLSLimits:
    """Bounds of the DTLS listener; a bad value raises ConfigError naming ``coap.dtls_<field>`` (the flat
    ``dtls_*`` keys of the [coap] section)."""

    max_sessions: int = 1000
    handshakes_per_second: float = 50.0
    handshake_burst: int = 50
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    rcvbuf: int = 4 * 1024 * 1024
    mtu: int = 1400
    cookie_rotation: float = 60.0
    exchange_lifetime: float = 30.0
    """Seconds aiocoap remembers a message id for deduplication (RFC 7252: 247 s, ~2.3 KB per message: GBs under
    load, BRIEF §2); a retransmission arriving later than that is taken as new."""
    max_inflight: int = 32
    """Requests of one session awaiting their commit; past it the session's new requests are dropped unread (the
    device retransmits its CON). The ``coap.max_inflight`` of coaps+tcp connections."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                key = "coap.max_inflight" if f.name == "max_inflight" else f"coap.dtls_{f.name}"
                raise ConfigError(key, f"must be > 0, got {value!r}")
        if not 256 <= self.mtu <= 65507:
            raise ConfigError("coap.dtls_mtu", f"must be 256..65507 (a UDP payload), got {self.mtu}")


@dataclass(slots=True)
class DTLSStats:
    """Counters for a metrics module; ``sessions`` is the current count."""

    sessions: int = 0
    datagrams: int = 0
    dropped_junk: int = 0
    hello_verify_sent: int = 0
    refused_capacity: int = 0
    refused_rate: int = 0
    handshakes_started: int = 0
    handshakes_completed: int = 0
    handshakes_failed: int = 0
    handshake_timeouts: int = 0
    sessions_expired: int = 0
    sessions_replaced: int = 0
    malformed_coap: int = 0
    record_errors: int = 0
    requests_dropped_busy: int = 0
    """Requests dropped unread: their session over ``max_inflight``, the outbox congested, or the gateway draining."""


def identity_of(remote: object) -> DeviceIdentity | None:
    """The device identity of a request's remote (DTLS here; any remote with a ``device_identity`` attribute)."""
    identity = getattr(remote, "device_identity", None)
    return identity if isinstance(identity, DeviceIdentity) else None


class DTLSRemote(interfaces.EndpointAddress):
    """One DTLS session as aiocoap sees it. Identity-hashed: a new session is a new remote (RFC 7252 §9.1.2)."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False
    maximum_block_size_exp = MAX_REGULAR_BLOCK_SIZE_EXP  # settable per instance, as aiocoap's own remotes

    def __init__(self, server: _Owner, session: Session, identity: DeviceIdentity) -> None:
        self._server = server
        self._session = session
        self.address = session.peer
        self.peer = f"{session.peer[0]}:{session.peer[1]}"  # for log lines, as a coaps+tcp connection's ``peer``
        self.device_identity = identity
        self.inflight = 0
        """Requests of this session awaiting their commit (counted by the site, as on a coaps+tcp connection)."""
        self.paused = False
        """While set, the server drops this session's new requests unread (UDP has no "stop reading")."""

    def __repr__(self) -> str:
        return f"<DTLSRemote {self.hostinfo} {self.device_identity.device_id}>"

    @property
    def hostinfo(self) -> str:
        return str(hostportjoin(self.address[0], self.address[1]))

    @property
    def hostinfo_local(self) -> str:
        return self._server.hostinfo_local

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> tuple[DeviceIdentity, ...]:
        return (self.device_identity,)

    @property
    def blockwise_key(self) -> tuple[Any, ...]:
        return (self.address, id(self._session))

    def send(self, data: bytes) -> None:
        self._server._send_app(self._session, data)

    # --- flow control, called by the site exactly as on a coaps+tcp DeviceConnection -------------------------

    def request_started(self) -> None:
        self.inflight += 1
        self._server.inflight += 1
        if self.inflight >= self._server.limits.max_inflight:
            self.paused = True

    def request_done(self) -> None:
        self.inflight -= 1
        self._server.inflight -= 1
        if self.paused and self.inflight <= self._server.limits.max_inflight // 2:
            self.resume()

    def pause(self) -> None:
        """The outbox is congested (the site calls :meth:`resume` through ``outbox.when_decongested``)."""
        self.paused = True

    def resume(self) -> None:
        if self.inflight < self._server.limits.max_inflight:
            self.paused = False


class Session:
    __slots__ = ("conn", "peer", "created", "last_seen", "established", "timer", "identity", "refusal", "remote",
                 "client_random")

    def __init__(self, conn: SSL.Connection, peer: tuple[Any, ...], now: float, client_random: bytes) -> None:
        self.conn = conn
        self.peer = peer
        self.client_random = client_random
        self.created = now
        self.last_seen = now
        self.established = False
        self.timer: asyncio.TimerHandle | None = None
        self.identity: DeviceIdentity | None = None
        self.refusal: str | None = None
        self.remote: DTLSRemote | None = None


class MessageInterface(interfaces.MessageInterface):
    """What aiocoap's MessageManager calls: send a CoAP message to a DTLSRemote; we never start sessions."""

    def __init__(self, server: _Owner) -> None:
        self._server = server

    def send(self, message: Message) -> None:
        message.remote.send(message.encode())

    async def shutdown(self) -> None:
        # Context.shutdown() got here through MessageManager.shutdown(), which already ended every exchange.
        self._server.detach()
        await self._server.close()

    async def determine_remote(self, message: Message) -> None:
        return None  # a server-only transport: requests to devices go out through sessions they opened

    async def recognize_remote(self, remote: object) -> bool:
        return isinstance(remote, DTLSRemote) and remote._server is self._server
