"""What every uplink connection shares, whichever MQTT client drives it (``uplink.client``): the in-flight
publishes, the acknowledgements handed to the outbox once per read, the futures the pump waits on, and what a
PUBACK does to a record (delete it, or quarantine it with the reason).

The clients (:mod:`edgegw.uplink._mqtt_client`, our own on asyncio; :mod:`edgegw.uplink._link`, paho) only move
bytes and call :meth:`LinkBase._settle` / :meth:`LinkBase._flush_acks`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from edgegw.mqtt.packets import ReasonCode
from edgegw.tracing import trace_id_of

if TYPE_CHECKING:
    from edgegw.outbox.store import Record
    from edgegw.uplink.paho_bridge import Uplink


_QUOTA_EXCEEDED = int(ReasonCode.QUOTA_EXCEEDED)  # 0x97


class PackedProperties(Protocol):
    """MQTT 5 PUBLISH properties already encoded (``_wire._PackedProperties``)."""

    def pack(self) -> bytes: ...


def reason_name(code: int) -> str:
    """``0x87`` -> ``Not authorized`` (the words paho uses, so logs read the same with either client)."""
    try:
        return ReasonCode(code).name.replace("_", " ").capitalize()
    except ValueError:
        return "Unknown reason code"


def _wake_up(slot: asyncio.Future[None]) -> None:
    if not slot.done():
        slot.set_result(None)


class LinkBase:
    """One connection attempt's state. Subclasses implement :meth:`establish`, :meth:`publish` and :meth:`close`."""

    _error: str | None = None
    paused = False
    """True while the transport's write buffer is over its high-water mark: the pump sends nothing more."""
    taken_over = False
    """The server ended this connection with DISCONNECT 0x8E "Session taken over" (MQTT 5): another client
    connected with our client id."""
    closed_by_server = False
    """The server closed this connection cleanly and gave no reason (no DISCONNECT, no error): what mosquitto 2.0
    does to the older of two connections with one client id, over MQTT 5 and 3.1.1 alike."""

    @property
    def error(self) -> str | None:
        """The last warning/error the client saw (e.g. the TLS alert that ended a handshake), for logs."""
        return self._error

    def __init__(self, uplink: Uplink, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        s = uplink._settings
        self.uplink = uplink
        self.loop = loop
        self.host, self.port = host, port
        self.failing_back = False
        self.mqtt5 = s.protocol == "5"
        # One packet id of the 65,535 stays for the command SUBSCRIBE: with all of them in flight the next PUBLISH
        # would look for a free one forever (the event loop stuck), as with a window of 65535 over MQTT 3.1.1.
        self.window = min(s.inflight_window, 0xFFFF - 1)
        self.inflight: dict[int, Record | list[Record]] = {}  # packet id -> the record, or the records of a frame
        self.acks: list[int] = []  # acknowledged record ids, handed to the outbox once per socket read
        self.connack: asyncio.Future[str | None] = loop.create_future()  # None: accepted; else why refused
        self.lost: asyncio.Future[str] = loop.create_future()
        self.slot: asyncio.Future[None] | None = None
        self.max_packet: int | None = None  # the server's Maximum Packet Size (MQTT 5 CONNACK)
        self.probe_mid = 0
        self.probe_next = 0
        self.probe_t = 0.0
        self.boundary = 0  # records with ids up to this are the backlog of this connection
        self.command_mid = -1  # packet id of the command-topic SUBSCRIBE
        self.commands_subscribed = False
        self.poked = False
        self.waits = 0  # times the pump slept on this link (tests: refill() keeps it asleep while it can)
        self.throttled_until = 0.0
        """When (``time.monotonic()``) the backoff set by a PUBACK 0x97 (Quota exceeded) ends: no PUBLISH before;
        the pump then reads the records not settled again, as a reconnect would (:meth:`Pump._pump`). 0: none."""
        self.refill: Callable[[], bool] | None = None
        """Set by the pump (native client only): called after PUBACKs were read, it refills the window from the
        live lane at once; True when the pump must still run."""

    # --- what a client implements -----------------------------------------------------------------------------

    async def establish(self) -> str | None:
        """Connect and wait for CONNACK, within ``connect_timeout``. None when connected, else why not."""
        raise NotImplementedError

    def publish(self, topic: str, payload: bytes, properties: PackedProperties | None) -> int:
        """Queue a QoS 1 PUBLISH; its packet id, or 0 if the link failed (then :attr:`lost` is set)."""
        raise NotImplementedError

    def close(self, graceful: bool) -> None:
        """Release everything; with ``graceful``, try to send DISCONNECT first. Idempotent."""
        raise NotImplementedError

    def _subscribe_commands(self) -> None:
        """SUBSCRIBE to :attr:`Uplink.command_filters` (nothing when there are none); after CONNACK only."""
        raise NotImplementedError

    encoded = False
    """True if the client takes PUBLISHes already encoded (:meth:`publish_packet`): the uplink's fast path."""

    def publish_packet(self, topic: bytes, payload: bytes, props: bytes, remaining: int) -> int:
        """:meth:`publish` of parts already encoded: ``topic`` with its two-byte length, ``props`` with its length
        (``b""`` over MQTT 3.1.1), ``remaining`` the packet's Remaining Length. Only where :attr:`encoded`."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------------------

    def set_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self._wake()

    async def wait(self, timeout: float) -> None:
        """Until a PUBACK, a commit in the outbox, the loss of the connection, or ``timeout`` seconds."""
        if self.poked or self.lost.done():
            self.poked = False
            return
        self.waits += 1
        slot = self.slot = self.loop.create_future()
        # A timer handle rather than asyncio.wait(timeout=): the pump waits once per loop turn with traffic, and
        # asyncio.wait builds a waiter future, callbacks and a set each time.
        timer = self.loop.call_later(timeout, _wake_up, slot)
        try:
            await slot
        finally:
            timer.cancel()
            self.slot = None
            self.poked = False

    def poke(self) -> None:
        self._wake()

    def _wake(self) -> None:
        self.poked = True
        if self.slot is not None and not self.slot.done():
            self.slot.set_result(None)

    def _flush_acks(self) -> None:
        if self.acks:
            self.uplink._outbox.ack(self.acks)
            self.acks = []

    def _settle(self, mid: int, code: int, reason_string: str | None = None) -> None:
        """The PUBACK of ``mid`` (reason ``code``): acknowledged records go to :attr:`acks`; a refusal (>= 0x80)
        quarantines every record the PUBLISH carried, except 0x97 (Quota exceeded): those records stay in the
        outbox, unsettled, and the link backs off (:meth:`Uplink._throttle`). Unknown packet ids are ignored."""
        carried = self.inflight.pop(mid, None)
        if carried is None:
            return
        records = carried if isinstance(carried, list) else (carried,)  # a frame carries a list of records
        uplink = self.uplink
        if code < 0x80:
            boundary = self.boundary
            backlog = 0
            for record in records:
                self.acks.append(record.id)
                if record.id <= boundary:
                    backlog += 1
            uplink.acked += len(records)
            if uplink.otel is not None:
                uplink.otel.uplink_acked(records)
            if backlog and uplink._backfill is not None:
                uplink._backfill.acked += backlog
        elif code == _QUOTA_EXCEEDED:  # throttled (e.g. AWS IoT): transient, the records stay in the outbox
            uplink._throttle(self, len(records))
        else:
            text = f"PUBACK {reason_name(code)} (0x{code:02x})"
            for record in records:
                uplink._quarantine(record.id, f"{text}: {reason_string}" if reason_string else text,
                                   trace_id_of(record.properties))
        if mid == self.probe_mid:
            uplink.last_rtt = time.monotonic() - self.probe_t
            self.probe_mid = 0
