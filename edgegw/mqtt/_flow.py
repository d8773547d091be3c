"""Flow control of a device connection (a mixin of :class:`~edgegw.mqtt.device.DeviceProtocol`): when reading stops
and resumes, and the publishes held meanwhile.

A publish is held, unacknowledged and with the socket no longer read, when a MQTT 3.1.1 QoS 1/2 publish meets a
full outbox (3.1.1 has no negative acknowledgement; docs/OUTBOX.md) or a rate limit or quota asks for backpressure
(docs/POLICY.md). What was parsed after it waits behind it, in order. Reading also pauses at ``receive_maximum``
unacknowledged publishes, while the outbox is congested, and while the device does not read our answers (the
transport's write buffer above its high-water mark).

A SUBSCRIBE's retained messages are bounded by the connection's output the same way: once the retained copies
waiting for the session journal's commit pass ``max_queued_messages``, or the write buffer its high-water mark, the
packets parsed after that SUBSCRIBE are deferred (in order) and reading stops, until the output drained. Without it
one read of pipelined SUBSCRIBEs, each matching thousands of retained messages, built them all at once (1.25 GB).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from edgegw.errors import OutboxError
from edgegw.mqtt.connection import (
    ConnectionState,
    Event,
    MQTTConnection,
    PublishReceived,
)
from edgegw.mqtt.packets import MQTT_5, NO_PROPERTIES, Properties, ReasonCode
from edgegw.outbox._record import OutboxFull, record_size
from edgegw.policy.limits import Limiter

if TYPE_CHECKING:
    from edgegw.mqtt.server import MQTTServer

log = structlog.get_logger("edgegw.mqtt")


class FlowControl:
    """Holds (full outbox, rate limits) and pause/resume of reading."""

    # Set by DeviceProtocol.__init__ (this class holds no state of its own).
    server: MQTTServer
    engine: MQTTConnection
    transport: asyncio.Transport | None
    device_id: str | None
    _loop: asyncio.AbstractEventLoop
    _paused: bool
    _write_blocked: bool
    _blocked_output: int
    _held: _Held | None
    _admitted: PublishReceived | None
    _deferred: list[Event] | None
    _deferred_scheduled: bool
    _retained_waiting: int

    # --- 3.1.1 backpressure on a full outbox (docs/OUTBOX.md) ------------------------------------------------

    def _fits(self, event: PublishReceived, record_props: bytes | None) -> bool:
        """Could this record ever be stored? One larger than the whole byte limit never will: holding it would
        stall the connection for good, so it is refused as before (3.1.1: closed)."""
        assert self.device_id is not None
        size = record_size(self.device_id, event.topic, event.publish.payload, record_props)
        return size <= self.server._outbox.byte_limit

    def _hold(self, held: _Held) -> None:
        """Keep the refused publish unacknowledged, stop reading, and try again when the outbox has room."""
        self._held = held
        self.server.stats.publish_held += 1
        self.pause(reason="outbox_full")
        log.debug("mqtt.publish_held", device_id=self.device_id, packet_id=held.event.publish.packet_id)
        self.server._outbox.when_room(self._retry_held)

    def _retry_held(self) -> None:
        held = self._held
        if held is None or held.limited:
            return
        if self.engine.state is not ConnectionState.CONNECTED:
            self._release_held()
            return
        try:
            self._submit(held.event, held.record_props)
        except OutboxFull:
            # Still no room for this device (e.g. its fair share): ask again a little later, so a "room" signal
            # that does not help this device cannot turn into a busy loop.
            self._loop.call_later(_HOLD_RETRY, self.server._outbox.when_room, self._retry_held)
            return
        except OutboxError:
            return  # the outbox is closing: the gateway is draining and closes this connection
        self._held = None
        log.debug("mqtt.publish_released", device_id=self.device_id, packet_id=held.event.publish.packet_id)
        self._stored(held.event, held.fwd, held.expires_at)
        self._process(held.rest)  # may hold again
        if self._held is None:
            self._maybe_resume()

    def _release_held(self) -> None:
        """The connection ended with publishes held (or deferred behind a SUBSCRIBE's retained messages): they were
        never acknowledged (the device resends them).
        Forget their packet ids, QoS 2 ones included, so a resend on a later connection is not mistaken for one
        being committed."""
        held, deferred = self._held, self._deferred
        if (held is None and deferred is None) or self.engine.state is not ConnectionState.CLOSED:
            return
        self._held = self._deferred = None
        events: list[Event] = [held.event, *held.rest] if held is not None else deferred or []
        for event in events:
            if isinstance(event, PublishReceived) and event.publish.packet_id is not None \
                    and self.engine.awaits_ack(event.publish.packet_id):
                self.engine.ack_publish(event.publish.packet_id, ReasonCode.QUOTA_EXCEEDED)  # closed: sends nothing

    @property
    def held_inflight(self) -> int:
        """QoS 1/2 publishes held back or deferred (counted in ``engine.inflight``, never submitted)."""
        held, deferred = self._held, self._deferred
        if held is None and deferred is None:
            return 0
        events: list[Event] = [held.event, *held.rest] if held is not None else deferred or []
        return sum(1 for e in events if isinstance(e, PublishReceived)
                   and e.publish.packet_id is not None and self.engine.awaits_ack(e.publish.packet_id))


    # --- rate limits and quotas (edgegw/policy/limits.py, docs/POLICY.md) -------------------------------------

    def _rate_limited(self, limiter: Limiter, event: PublishReceived) -> bool:
        """First thing for every publish: True if the limiter delayed, refused or dropped it (then nothing else
        is done with it now).

        Nothing is lost unless the rule says ``drop`` and the publish is QoS 0. ``reject`` needs a MQTT 5 QoS 1/2
        acknowledgement to carry 0x97, and ``drop`` of a QoS 1/2 publish is refused like ``reject``; what cannot
        be honoured (3.1.1, QoS 0 under ``reject``) becomes backpressure: the publish is held unacknowledged, the
        socket is not read, and after the wait it is admitted again and processed, in order, before what followed.
        """
        if event is self._admitted:  # released by _retry_limited: its tokens are taken
            self._admitted = None
            return False
        publish = event.publish
        assert self.device_id is not None
        admission = limiter.admit(self.device_id, len(publish.payload))
        if not admission.wait_s:
            return False
        packet_id = publish.packet_id
        if admission.action == "drop" and packet_id is None:
            limiter.record(admission, "drop", "mqtt")
        elif admission.action != "backpressure" and packet_id is not None and self.engine.protocol_level == MQTT_5:
            limiter.record(admission, "reject", "mqtt")
            self.engine.ack_publish(packet_id, ReasonCode.QUOTA_EXCEEDED)
        else:
            limiter.record(admission, "backpressure", "mqtt")
            self._held = _Held(event, None, NO_PROPERTIES, None, limited=True)
            self.pause(reason="rate_limited")
            self._loop.call_later(_limit_wait(admission.wait_s), self._retry_limited)
            return True
        stats = self.server.stats  # refused or dropped: received all the same
        stats.publish_received += 1
        stats.publish_received_by_qos[publish.qos] += 1
        return True

    def _retry_limited(self) -> None:
        held = self._held
        if held is None or not held.limited:
            return
        if self.engine.state is not ConnectionState.CONNECTED:
            self._release_held()
            return
        limiter = self.server.limiter
        if limiter is not None:
            assert self.device_id is not None
            admission = limiter.admit(self.device_id, len(held.event.publish.payload))
            if admission.wait_s:  # still over (or another device took the shared tokens): wait again
                self._loop.call_later(_limit_wait(admission.wait_s), self._retry_limited)
                return
        self._held = None
        self._admitted = held.event
        self._on_publish(held.event)  # may be held again, by a full outbox
        self._admitted = None  # taken by _rate_limited, or never looked at (limits turned off by a reload meanwhile)
        if self._held is not None:
            self._held.rest.extend(held.rest)
            self.flush()
            return
        self._process(held.rest)  # may hold again
        if self._held is None:
            self._maybe_resume()

    # --- pause and resume of reading -----------------------------------------------------------------------

    def pause(self, *, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            log.debug("mqtt.paused", device_id=self.device_id, reason=reason)

    def pause_writing(self) -> None:
        """The transport's write buffer passed its high-water mark: the device does not read what we send. Each
        packet it sends may add an answer (PUBACK, PINGRESP, SUBACK, ...), so it is not read either until the
        buffer drains; otherwise a device that writes and never reads would grow our memory without bound."""
        self._write_blocked = True
        self._blocked_output = output_mark(self.transport) if self.transport is not None else 0
        self.pause(reason="write_buffer_full")

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._maybe_resume()

    # --- a SUBSCRIBE's retained messages, bounded by the output ----------------------------------------------

    def _output_room(self) -> bool:
        """May this connection's next packet be processed? Not while the retained copies waiting for the session
        journal's commit are past ``max_queued_messages``, nor while the write buffer is above its high-water
        mark (each SUBSCRIBE may add thousands of PUBLISHes to either)."""
        return not self._write_blocked and self._retained_waiting <= self.server.settings.max_queued_messages

    def _defer(self, events: list[Event]) -> None:
        """The output is over its bound: keep ``events`` (parsed, not processed) in order, and stop reading until
        the output drained (:meth:`_run_deferred`)."""
        self._deferred = events
        self.pause(reason="output_full")

    def _run_deferred(self) -> None:
        """Scheduled (never run inside a write or another packet's processing, so order holds): the output has
        drained, process what was deferred (it may defer again), then resume reading."""
        self._deferred_scheduled = False
        events = self._deferred
        if events is None or self.engine.state is not ConnectionState.CONNECTED or not self._output_room():
            return
        self._deferred = None
        self._process(events)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self._deferred is not None:  # packets wait for the output first; reading resumes after them
            if not self._deferred_scheduled and self._output_room():
                self._deferred_scheduled = True
                self._loop.call_soon(self._run_deferred)
            return
        if (self._paused and self._held is None and not self._write_blocked and not self.server._draining
                and self.transport is not None
                and self.engine.state is ConnectionState.CONNECTED
                and self.engine.inflight <= self.server.settings.receive_maximum // 2
                and not self.server._outbox.congested):
            self._paused = False
            self.transport.resume_reading()


_HOLD_RETRY = 0.05
"""Seconds before a held publish that was refused again asks the outbox for room again."""

_LIMIT_WAIT = (0.01, 5.0)
"""A rate-limited device is looked at again after its wait, but not sooner than 10 ms (tokens for a batch
accumulate: one timer per batch, not per message) nor later than 5 s (a quota raised by a reload is noticed)."""


def output_mark(transport: asyncio.BaseTransport) -> int:
    """How far a device read what we sent, as a number that grows when it reads: the bytes our TLS transport
    handed to the socket (``mqtt/_tls.py`` ``sent``); for another transport (the lab listener's), minus its
    buffer's size. The buffer alone cannot tell a slow reader from none while deliveries are added to it."""
    sent = getattr(transport, "sent", None)
    return sent if isinstance(sent, int) else -transport.get_write_buffer_size()  # type: ignore[attr-defined]


@dataclass(slots=True)
class _Held:
    """A 3.1.1 QoS 1/2 publish the full outbox refused, kept unacknowledged until it can be stored, and the events
    parsed after it (processed, in order, once it is)."""

    event: PublishReceived
    record_props: bytes | None
    fwd: Properties
    expires_at: float | None
    rest: list[Event] = field(default_factory=list)
    limited: bool = False
    """Held by a rate limit or quota (not yet admitted, nothing computed: released by ``_retry_limited``)."""


def _limit_wait(wait_s: float) -> float:
    low, high = _LIMIT_WAIT
    return max(low, min(wait_s, high))
