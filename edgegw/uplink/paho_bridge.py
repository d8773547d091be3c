"""The uplink: outbox records to the cloud broker as QoS 1 publishes over MQTT with mutual TLS.

The MQTT client is chosen by ``uplink.client``: ``native`` (:mod:`edgegw.uplink._mqtt_client`, our own on asyncio
and edgegw's codec: PUBLISHes of a loop turn in one TLS write, PUBACKs parsed from bytes) or ``paho``
(:mod:`edgegw.uplink._link`). Everything else is shared: :class:`Uplink` here (connect, failover, takeover,
quarantine, counters), with its mixins :mod:`edgegw.uplink._pump` (the pump and its two lanes),
:mod:`edgegw.uplink._sending` (records and frames to PUBLISHes) and :mod:`edgegw.uplink._commands` (the downlink). Every connection attempt starts a clean session, so nothing is resent by
a client on its own: what was not acknowledged is sent again from the outbox.

Live records reach the pump in memory: the outbox hands each committed group over (:meth:`Outbox.add_handoff`),
so SQLite is read only for a backlog (after a reconnect or restart) or when the pump fell behind.

A record leaves the outbox only when the upstream acknowledged it (PUBACK < 0x80: :meth:`Outbox.ack`) or refused it
(PUBACK >= 0x80: :meth:`Outbox.quarantine`, never retried forever and never silently dropped), except for 0x97
(Quota exceeded): a throttle, after which the records go again (:meth:`Uplink._throttle`).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from edgegw.config import UplinkSettings
from edgegw.ops.otel import Spans
from edgegw.outbox.store import Outbox
from edgegw.uplink._backfill import Backfill
from edgegw.uplink._commands import Commands
from edgegw.uplink._endpoints import FLAP_SECONDS, Endpoint, Endpoints
from edgegw.uplink._link import _Link
from edgegw.uplink._linkbase import LinkBase
from edgegw.uplink._mqtt_client import NativeLink
from edgegw.uplink._pump import Pump
from edgegw.uplink._sending import Sending
from edgegw.uplink._wire import RecordWire, _user_properties, iso_utc_ms

__all__ = ["Downlink", "Uplink", "UplinkState", "_user_properties", "iso_utc_ms"]

UplinkState = Literal["connecting", "connected", "down"]

_THROTTLE_MIN, _THROTTLE_MAX = 1.0, 30.0  # seconds of backoff after a PUBACK 0x97 (Quota exceeded)

Downlink = Callable[..., bool]
"""``(device_id, topic, payload, qos, properties, *, message_expiry) -> bool``: :meth:`MQTTServer.deliver_downlink`."""



class Uplink(Pump, Sending, Commands):
    """Run :meth:`run` as a task; cancel it to stop (it sends DISCONNECT if it can and releases everything)."""

    def __init__(self, settings: UplinkSettings, outbox: Outbox, *, client_id: str,
                 ssl_context: ssl.SSLContext, downlink: Downlink | None = None, otel: Spans | None = None) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self._settings = settings
        self._outbox = outbox
        self.client_id = client_id
        self._ssl_context = ssl_context
        self._read_buffer: memoryview | None = None  # the native client's TLS read buffer, made at first use
        self._wire = RecordWire(settings.topic_prefix)
        self._link_class: type[LinkBase] = NativeLink if settings.client == "native" else _Link
        self._log = structlog.get_logger("edgegw.uplink")
        self._state: UplinkState = "down"
        self._running = False
        self._backfill: Backfill | None = None
        self._endpoints = Endpoints(settings)
        self.endpoint: str | None = None
        """``host:port`` of the upstream this uplink is connected to, or None."""
        self._link: LinkBase | None = None
        self.otel = otel
        """OpenTelemetry span hooks (edgegw.uplink: PUBLISH -> PUBACK), or None: export off."""
        self.downlink = downlink
        """Where commands from ``command_topic`` go (the daemon wires ``MQTTServer.deliver_downlink``)."""
        self.commands: Any = None
        """With tenants: which filters to subscribe to and which device a command topic names, tenant-aware
        (edgegw/pipeline/commands.py ``TenantCommands``); None: ``{topic_prefix}/{device_id}/rest``."""
        self.commands_delivered = 0
        """Commands from upstream handed to a device session with a matching subscription."""
        self.commands_undeliverable = 0
        """Commands not delivered: no such session or subscription, a topic that names no single device, a
        retained message, or no downlink wired."""
        self.sent = 0
        """Publishes handed to the broker (a record sent again after a reconnect counts again)."""
        self.acked = 0
        """PUBACKs with a success reason code (0x10 "no matching subscribers" included)."""
        self.refused = 0
        """PUBACKs with a reason code >= 0x80 but 0x97; those records were quarantined."""
        self.throttled = 0
        """PUBACKs with 0x97 (Quota exceeded): those records stayed in the outbox and went again after a backoff."""
        self._throttle_step = 0  # backoffs in a row without a success PUBACK between them
        self._acked_at_resume = 0  # ``acked`` when the last backoff ended: more since then is a success
        self.reconnects = 0
        """Successful connections after the first one."""
        self.frames_sent = 0
        """Batch frames handed to the broker (``batch_max_records`` > 1)."""
        self.bytes_sent = 0
        """MQTT PUBLISH packet bytes handed to the broker (before TLS), records and frames alike."""
        self.connect_failures = 0
        self.writes = 0
        """Writes of PUBLISHes to the upstream connection by the native client (each carries every PUBLISH of one
        loop turn); sent / writes is how many share a TLS write."""
        self.session_takeovers = 0
        """Connections ended because another client connected with our client id (see :meth:`_taken_over`)."""
        self.expired: dict[str, int] = {}
        """Records deleted unsent because their MQTT 5 Message Expiry Interval passed, per device."""
        self.handed_off = 0
        """Live records taken from the outbox's commit hand-off, i.e. not read back from SQLite."""
        self.last_rtt: float | None = None
        """Seconds from PUBLISH to PUBACK of the most recent sampled message (one sample in flight at a time)."""

    @property
    def state(self) -> UplinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    @property
    def inflight(self) -> int:
        return len(self._link.inflight) if self._link is not None else 0

    # --- connection lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        if self._running:
            raise RuntimeError("Uplink.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        s = self._settings
        attempt = 0
        connections = 0
        flaps = 0  # connections in a row the server closed soon after accepting them, without a reason
        endpoints = self._endpoints
        try:
            while True:
                self._state = "connecting"
                endpoint = endpoints.choose()
                link = self._link = self._link_class(self, loop, endpoint.host, endpoint.port)
                graceful = False
                connected_at = 0.0
                failback: asyncio.Task[None] | None = None
                try:
                    error = await link.establish()
                    if error is None:
                        if connections:
                            self.reconnects += 1
                        connections += 1
                        self._state = "connected"
                        self.endpoint = endpoint.name
                        connected_at = time.monotonic()
                        self._log.info("uplink.connected", host=endpoint.host, port=endpoint.port,
                                       protocol=s.protocol, client=s.client, client_id=self.client_id,
                                       window=link.window,
                                       backlog=self._outbox.depth)
                        if endpoints.policy == "priority" and endpoint.rank > 0:
                            failback = loop.create_task(self._failback(link, endpoint), name="uplink-failback")
                        graceful = True
                        reason = await self._pump(link)
                        graceful = False
                        self._log.warning("uplink.disconnected", reason=reason, error=link.error,
                                          host=endpoint.host, port=endpoint.port,
                                          unacked=len(link.inflight), sent=self.sent, acked=self.acked)
                finally:
                    if failback is not None:
                        failback.cancel()
                    link.close(graceful=graceful)
                    self._state = "down"
                    self.endpoint = None
                flapped = (error is None and time.monotonic() - connected_at < FLAP_SECONDS
                           and not link.failing_back)
                flaps = flaps + 1 if flapped and link.closed_by_server else 0
                if error is None and (link.taken_over or flaps >= 2):
                    self._taken_over(link, flaps)
                if error is None and not flapped:
                    attempt = 0  # a connection that lasted: the next attempt starts from reconnect_min again
                    endpoints.succeeded(endpoint)
                elif endpoints.failed(endpoint):
                    attempt = 0  # the next endpoint gets a fresh, short backoff
                    self._log.warning("uplink.circuit_open", host=endpoint.host, port=endpoint.port,
                                      cooldown=endpoints.cooldown, reason=error or "connection lost at once")
                # Full jitter over an exponential cap, spreading a fleet that lost the same broker; the floor of
                # reconnect_min/2 keeps a broker that accepts and drops at once from being hammered. A connection
                # lost within FLAP_SECONDS does not reset ``attempt``: two gateways with one client id take each
                # other's session over at most once per backoff period, not several times a second.
                cap = min(s.reconnect_max, s.reconnect_min * 2 ** min(attempt, 30))
                delay = max(s.reconnect_min / 2, random.uniform(0, cap))
                if error is not None:
                    self.connect_failures += 1
                    self._log.warning("uplink.connect_failed", host=endpoint.host, port=endpoint.port, error=error,
                                      attempt=attempt + 1, retry_in=round(delay, 3))
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            self._state = "down"
            self._link = None
            self._running = False
            self._log.info("uplink.stopped", sent=self.sent, acked=self.acked, refused=self.refused,
                           reconnects=self.reconnects, writes=self.writes)

    def _taken_over(self, link: LinkBase, flaps: int) -> None:
        """Another client connected with our client id and the broker closed us (MQTT-3.1.4-3): two gateways with
        one ``gateway.id``, or a leftover process. Certain with DISCONNECT 0x8E; mosquitto 2.0 sends none (over
        MQTT 5 as over 3.1.1) and only closes the older connection, so a second clean close without a reason
        within FLAP_SECONDS of the CONNACK counts too. The backoff in :meth:`run` keeps growing meanwhile."""
        # Told by close alone, the first takeover of a streak is recognised only at the second: count both then.
        self.session_takeovers += 2 if flaps == 2 and not link.taken_over else 1
        evidence = ("DISCONNECT from server: Session taken over (0x8e)" if link.taken_over else
                    f"the server closed {flaps} connections in a row within {FLAP_SECONDS:g} s of accepting "
                    "them, without a reason (mosquitto's way of ending the older of two sessions)")
        self._log.error("uplink.session_taken_over", client_id=self.client_id, evidence=evidence,
                        takeovers=self.session_takeovers, host=link.host, port=link.port,
                        hint="another client uses this client id: is gateway.id unique?")

    async def _failback(self, link: LinkBase, current: Endpoint) -> None:
        """Connected to a lower-priority endpoint: every ``breaker_cooldown`` s, probe the higher ones with a TCP
        connect; when one answers, end this connection gracefully so the next attempt goes there."""
        while not link.lost.done():
            await asyncio.sleep(self._endpoints.cooldown)
            for candidate in self._endpoints.better_than(current):
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(candidate.host, candidate.port), self._settings.connect_timeout)
                except (OSError, TimeoutError):
                    continue
                writer.transport.abort()
                self._log.info("uplink.failing_back", to=candidate.name, current=current.name)
                link.failing_back = True
                link.set_lost(f"failing back to {candidate.name}")
                return

    # --- the pump -------------------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Records of the backlog (present when the current connection came up) not yet acknowledged."""
        return self._backfill.remaining() if self._backfill is not None else 0

    @property
    def backfill_eta(self) -> float | None:
        """Seconds until the backlog is drained at the rate seen so far (or the configured pace); 0 when there
        is none; None while disconnected or before the first acknowledgement of an unpaced backlog."""
        if self._state != "connected" or self._backfill is None:
            return None
        return self._backfill.eta()

    def _throttle(self, link: LinkBase, records: int) -> None:
        """A PUBACK 0x97 (Quota exceeded: the upstream throttles us, as AWS IoT does): transient, unlike the other
        refusals. The records of that PUBLISH stay in the outbox (neither acknowledged nor quarantined) and this link
        sends nothing for a backoff: 1 s, doubled per backoff in a row up to 30 s, back to 1 s once a PUBACK said
        success since the last one ended. Then the pump sends what is not settled again, in order, as after a
        reconnect (:meth:`Pump._pump`). 0x97s for PUBLISHes already in flight fall in the same backoff: one log line
        per backoff, never one per message. One that comes after the backoff ended, while the pump still waits for
        the PUBLISHes in flight, is the upstream still throttling: it starts the next backoff in a row."""
        self.throttled += 1
        now = time.monotonic()
        if link.throttled_until > now:
            return
        # Past its deadline but not resumed yet (``throttled_until`` still set): nothing was sent since that backoff,
        # so successes meanwhile are of PUBLISHes from before it and do not reset the step.
        if not link.throttled_until and self.acked != self._acked_at_resume:
            self._throttle_step = 0
        delay = min(_THROTTLE_MAX, _THROTTLE_MIN * 2 ** self._throttle_step)
        self._throttle_step = min(self._throttle_step + 1, 30)
        link.throttled_until = now + delay
        self._log.warning("uplink.throttled", reason="PUBACK Quota exceeded (0x97)", backoff=delay,
                          records=records, inflight=len(link.inflight), throttled=self.throttled,
                          host=link.host, port=link.port)

    def _quarantine(self, record_id: int, reason: str, trace: str | None = None) -> None:
        self.refused += 1
        self._outbox.quarantine(record_id, reason)
        self._log.warning("uplink.publish_refused", record_id=record_id, reason=reason, trace_id=trace)
