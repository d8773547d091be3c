"""The downlink through the CoAP site, mixed into :class:`~edgegw.coap.site.PubSubSite`: a GET + Observe on
``/ps/{filter...}`` becomes an observation (at most ``coap.max_observations`` per device), and :meth:`Observing.deliver`
sends a command from upstream to the matching ones as notifications."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from aiocoap import Message
from aiocoap.numbers.codes import Code

from edgegw.coap._site_publish import CONTENT_TYPES
from edgegw.coap._site_requests import Refused, RequestChecks
from edgegw.config import CoAPSettings
from edgegw.policy.acl import ACL, topic_matches

log = structlog.get_logger("edgegw.coap")

_FORMAT_OF = {mime: fmt for fmt, mime in CONTENT_TYPES.items()}

_OBSERVE_MAX = (1 << 24) - 1


@dataclass(slots=True, eq=False)
class _Observation:
    device_id: str
    topic_filter: tuple[str, ...]
    pipe: Any
    seq: int = 0
    remote: Any = None
    """The coaps+tcp connection it came on (None over DTLS: UDP buffers nothing of ours)."""


class Observing(RequestChecks):
    """Mixed into :class:`~edgegw.coap.site.PubSubSite` (which sets these attributes)."""

    settings: CoAPSettings
    acl: ACL
    observers: dict[str, list[_Observation]]

    # --- observe (downlink) --------------------------------------------------------------------------------------

    async def _observe(self, request: Message, pipe: Any, device_id: str, levels: tuple[str, ...]) -> Message | None:
        topic_filter = self._topic(device_id, levels, is_filter=True)
        if not self.acl.may_subscribe(device_id, topic_filter):
            raise Refused(Code.FORBIDDEN, f"observing {topic_filter!r} not allowed")
        if request.opt.observe != 0:
            # Nothing is retained for CoAP: a plain GET (or an Observe deregistration) gets an empty 2.05.
            return Message(code=Code.CONTENT)
        mine = self.observers.setdefault(device_id, [])
        if len(mine) >= self.settings.max_observations:
            raise Refused(Code.SERVICE_UNAVAILABLE, f"at most {self.settings.max_observations} observations",
                          max_age=self.settings.full_max_age)
        conn = request.remote if hasattr(request.remote, "observing") else None
        obs = _Observation(device_id, tuple(topic_filter.split("/")), pipe, remote=conn)
        mine.append(obs)
        self.stats.observations += 1
        if conn is not None:
            conn.observing += 1
        log.info("coap.observe_started", device_id=device_id, topic_filter=topic_filter)
        first = Message(code=Code.CONTENT, observe=0)
        pipe.add_response(first, is_last=False)
        try:
            # Commands arrive through deliver_downlink (synchronous); this only keeps the observation's lifetime.
            # aiocoap cancels the task when the interest ends: the connection closed, a deregistration, shutdown.
            await asyncio.get_running_loop().create_future()
        finally:
            if conn is not None:
                conn.observing -= 1
            if obs in mine:  # end_disallowed_observations may have taken it out already
                mine.remove(obs)
            if not mine and self.observers.get(device_id) is mine:
                del self.observers[device_id]
            log.info("coap.observe_ended", device_id=device_id, topic_filter=topic_filter)
        return None  # pragma: no cover - the future never resolves

    def end_disallowed_observations(self) -> int:
        """After a reload: end the observations whose filter the new ACL refuses, with a last 4.03 notification
        (RFC 7641 §3.2); how many. :meth:`deliver` trusts what :meth:`_observe` accepted, as MQTT routing trusts what
        SUBSCRIBE accepted (whose reload ends the subscriptions it no longer allows, edgegw/pipeline/reload.py)."""
        ended = 0
        for device_id, mine in list(self.observers.items()):
            for obs in list(mine):
                if self.acl.may_subscribe(device_id, "/".join(obs.topic_filter)):
                    continue
                mine.remove(obs)  # no notification from now on, even before its task has ended
                if not mine and self.observers.get(device_id) is mine:
                    del self.observers[device_id]
                ended += 1
                try:  # the last response ends the request: aiocoap cancels its task (the finally in _observe)
                    obs.pipe.add_response(Message(code=Code.FORBIDDEN, payload=b"no longer allowed by the ACL"),
                                          is_last=True)
                except Exception as exc:  # noqa: BLE001 - a broken connection must not stop the others
                    log.warning("coap.notification_failed", device_id=device_id, error=repr(exc)[:200])
        if ended:
            log.info("coap.observations_ended", count=ended, reason="no longer allowed by acl.subscribe")
        return ended

    def deliver(self, device_id: str, topic: str, payload: bytes, content_type: str | None = None) -> bool:
        """A command from upstream (``devices/{device_id}/rest``) to this device's matching observations, now.
        True if at least one observation matched. Synchronous: one notification write per observation."""
        mine = self.observers.get(device_id)
        if not mine:
            return False
        parts = tuple(topic.split("/"))
        fmt = _FORMAT_OF.get(content_type) if content_type else None
        delivered = False
        for obs in list(mine):
            if not topic_matches(obs.topic_filter, parts):
                continue
            if obs.remote is not None and obs.remote._write_blocked:
                # Its connection does not read what we write: not one more notification into that buffer (an
                # observation keeps the connection from the idle sweep, so nothing else would bound it).
                self.stats.notifications_dropped_backlog += 1
                continue
            obs.seq = obs.seq + 1 if obs.seq < _OBSERVE_MAX else 1
            note = Message(code=Code.CONTENT, payload=payload, observe=obs.seq)
            if fmt is not None:
                note.opt.content_format = fmt
            try:
                obs.pipe.add_response(note, is_last=False)
            except Exception as exc:  # noqa: BLE001 - a broken connection must not stop the others
                log.warning("coap.notification_failed", device_id=device_id, error=repr(exc)[:200])
                continue
            self.stats.notifications += 1
            delivered = True
        return delivered
