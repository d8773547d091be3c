"""The CoAP resources (draft-ietf-core-coap-pubsub, EMQX's ``/ps`` paths): publish, observe commands, discovery.

==========================  ============================================================================
``POST``/``PUT /ps/{t...}`` publish to ``devices/{device_id}/{t...}``: 2.01 (POST) / 2.04 (PUT) once the
                            record is committed to the outbox (a NON request over UDP: at once, best-effort)
``GET /ps/{f...}`` Observe  downlink commands for ``devices/{device_id}/{f...}`` (an MQTT filter: ``+``, ``#``)
``GET /.well-known/core``   what this device may use (RFC 6690 link format), from the ACL
==========================  ============================================================================

The device id is the verified identity of the request's remote: ``remote.device_identity`` (set by the coaps+tcp
listener, and by the DTLS transport, :mod:`edgegw.coap.dtls`); on the lab UDP listener only, the ``c=`` query.

Per publish (:meth:`PubSubSite.publish_now`, called by :class:`edgegw.coap._fastpath.PublishTokenManager` before
aiocoap makes a Pipe and a task): no task, no future; ``outbox.submit`` is synchronous (no await on SQLite) and its
``on_commit`` sends the 2.01/2.04. Other requests (GET+Observe, discovery) take aiocoap's path: a task each, through
:meth:`PubSubSite.render_to_pipe`. Refusals are logged
(``coap.request_refused``, rate-limited per event name by :mod:`edgegw.logs`); successes only at debug.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog
from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.types import Type

from edgegw.config import CoAPSettings
from edgegw.errors import OutboxError
from edgegw.identity import DeviceIdentity
from edgegw.outbox._record import OutboxFull
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL, topic_matches
from edgegw.tracing import from_payload, new_traceparent

log = structlog.get_logger("edgegw.coap")

Admit = Callable[[str, int], float]
"""The rate-limit seam: ``admit(device_id, payload_bytes)`` -> seconds until this request would be allowed,
0 = go now. Answered 4.29 Too Many Requests with Max-Age = ceil(seconds). Called once per publish, synchronously."""

Authorizer = Callable[[DeviceIdentity], "str | None"]

Answer = Callable[[Message, Message], None]
"""``answer(request, response)``: sends ``response`` to ``request`` through aiocoap's token interface (set by
:class:`edgegw.coap._fastpath.PublishTokenManager`)."""

PipelineOf = Callable[[], Any]
"""Returns the running :class:`edgegw.pipeline.engine.Pipeline` (routes, transforms, tenants), or None: records
stored as sent. A callable, so the pipeline the MQTT listener gets on reload is the one CoAP uses too."""


def always_admit(device_id: str, nbytes: int) -> float:
    return 0.0


CONTENT_TYPES: dict[int, str] = {
    int(ContentFormat.JSON): "application/json",
    int(ContentFormat.CBOR): "application/cbor",
    int(ContentFormat.OCTETSTREAM): "application/octet-stream",
}
"""Content formats accepted on publish, and the MIME type stored as the record's ``ct`` (sent upstream as the MQTT 5
Content Type). A request without Content-Format is stored without ``ct``."""
_FORMAT_OF = {mime: fmt for fmt, mime in CONTENT_TYPES.items()}

_OBSERVE_MAX = (1 << 24) - 1
_ACL_MEMO = 4096
_ACL_MEMO_TOPIC = 256
_BAD_LEVEL = ("+", "#", "")


@dataclass(slots=True)
class CoAPStats:
    requests: int = 0
    published: int = 0
    """Publishes acknowledged (committed, or accepted best-effort for NON)."""
    refused: int = 0
    """Answered 4.xx (unauthenticated, forbidden, bad request, too large, unsupported format)."""
    rate_limited: int = 0
    outbox_full: int = 0
    commit_failed: int = 0
    observations: int = 0
    notifications: int = 0


class Refused(Exception):
    """A request answered with an error code (and logged)."""

    def __init__(self, code: Code, why: str, max_age: int | None = None, size1: int | None = None) -> None:
        super().__init__(why)
        self.code = code
        self.why = why
        self.max_age = max_age
        self.size1 = size1


@dataclass(frozen=True, slots=True)
class _Publish:
    """A publish that passed its checks: what is stored, and what its answer and log lines need."""
    device_id: str
    topic: str
    payload: bytes
    tp: str
    record_props: bytes
    reliable: bool


@dataclass(slots=True, eq=False)
class _Observation:
    device_id: str
    topic_filter: tuple[str, ...]
    pipe: Any
    seq: int = 0


class PubSubSite(interfaces.Resource):
    """The one resource of the CoAP context: routes by path itself (no aiocoap Site, no block-wise assembly)."""

    def __init__(self, settings: CoAPSettings, outbox: Outbox, acl: ACL, *, admit: Admit = always_admit,
                 authorizer: Authorizer | None = None, is_lab: Callable[[Any], bool] = lambda remote: False,
                 pipeline: PipelineOf = lambda: None) -> None:
        super().__init__()
        self.settings = settings
        self.outbox = outbox
        self._acl = acl
        self._may_publish: dict[tuple[str, str], bool] = {}
        self.admit = admit
        self.authorizer = authorizer
        """For remotes without a connection-level verdict (DTLS, lab): registry/CRL check per request."""
        self.is_lab = is_lab
        self.pipeline = pipeline
        self.seen: Callable[[str, Any], None] | None = None
        """Set by the daemon: notes the remote's certificate (tenant/tier from O, OU...) before the limiter asks."""
        self.stats = CoAPStats()
        self.observers: dict[str, list[_Observation]] = {}

    @property
    def acl(self) -> ACL:
        return self._acl

    @acl.setter
    def acl(self, acl: ACL) -> None:  # a reload: the verdicts of the old rules go with them
        self._acl = acl
        self._may_publish = {}

    def _publish_allowed(self, device_id: str, topic: str) -> bool:
        """``acl.may_publish``, remembered: a device publishes to the same few topics again and again, and the
        pattern walk was the largest single cost of a DTLS publish (docs/COAP.md "Performance"). Bounded: at most
        ``_ACL_MEMO`` verdicts for topics of at most ``_ACL_MEMO_TOPIC`` characters; emptied when full."""
        key = (device_id, topic)
        verdict = self._may_publish.get(key)
        if verdict is None:
            verdict = self._acl.may_publish(device_id, topic)
            if len(topic) <= _ACL_MEMO_TOPIC:
                if len(self._may_publish) >= _ACL_MEMO:
                    self._may_publish = {}
                self._may_publish[key] = verdict
        return verdict

    # aiocoap's abstract methods; render_to_pipe below replaces their use.
    async def render(self, request: Message) -> Message:  # pragma: no cover - never called
        raise NotImplementedError

    async def needs_blockwise_assembly(self, request: Message) -> bool:  # pragma: no cover
        return False

    # --- dispatch ------------------------------------------------------------------------------------------------

    async def render_to_pipe(self, pipe: Any) -> None:
        request: Message = pipe.request
        self.stats.requests += 1
        try:
            response = await self._render(request, pipe)
        except Refused as exc:
            response = self._refusal(request, exc)
        if response is not None:
            pipe.add_response(response, is_last=True)
        remote = request.remote
        if getattr(remote, "refused", None) is not None and hasattr(remote, "close"):
            remote.close()  # one answer per connection of a refused device, then it is closed

    async def _render(self, request: Message, pipe: Any) -> Message | None:
        device_id = self._device_id(request)
        path = request.opt.uri_path
        code = request.code
        if path and path[0] == "ps":
            topic = path[1:]
            if code in (Code.POST, Code.PUT):
                return await self._publish(request, device_id, topic)
            if code == Code.GET:
                return await self._observe(request, pipe, device_id, topic)
            raise Refused(Code.METHOD_NOT_ALLOWED, f"{code} not allowed on /ps")
        if path == (".well-known", "core"):
            if code != Code.GET:
                raise Refused(Code.METHOD_NOT_ALLOWED, f"{code} not allowed on /.well-known/core")
            return self._discovery(device_id)
        raise Refused(Code.NOT_FOUND, "no such resource")

    def _device_id(self, request: Message) -> str:
        """The verified device id of the request's remote; Refused 4.01 / 4.03 otherwise."""
        remote = request.remote
        identity: DeviceIdentity | None = getattr(remote, "device_identity", None)
        if identity is None:
            if self.is_lab(remote):
                for query in request.opt.uri_query:
                    if query.startswith("c=") and len(query) > 2:
                        return query[2:]
                raise Refused(Code.UNAUTHORIZED, "lab listener: no c={device_id} query")
            raise Refused(Code.UNAUTHORIZED, "no verified client certificate")
        refused = getattr(remote, "refused", None)
        if refused is None and self.authorizer is not None and not hasattr(remote, "refused"):
            refused = self.authorizer(identity)  # DTLS remotes: no connection-level verdict of ours
        if refused is not None:
            raise Refused(Code.FORBIDDEN, refused)
        return identity.device_id

    def _refusal(self, request: Message, exc: Refused) -> Message:
        # 4.29 / 5.03 are counted where raised, and logged by the outbox / limiter at most every few seconds.
        if exc.code not in (Code.TOO_MANY_REQUESTS, Code.SERVICE_UNAVAILABLE):
            self.stats.refused += 1
            remote = request.remote
            identity = getattr(remote, "device_identity", None)
            log.warning("coap.request_refused", code=str(exc.code), reason=exc.why,
                        device_id=identity.device_id if identity else None,
                        peer=getattr(remote, "peer", None) or _hostinfo(remote), method=str(request.code),
                        path="/" + "/".join(request.opt.uri_path)[:200])
        response = Message(code=exc.code, payload=exc.why.encode()[:200])
        if exc.max_age is not None:
            response.opt.max_age = exc.max_age
        if exc.size1 is not None:
            response.opt.size1 = exc.size1
        return response

    # --- publish -------------------------------------------------------------------------------------------------

    def _topic(self, device_id: str, levels: tuple[str, ...], *, is_filter: bool) -> str:
        if not levels or levels == ("",):
            raise Refused(Code.BAD_REQUEST, "a topic is needed after /ps/")
        for i, level in enumerate(levels):
            if "\x00" in level or "/" in level:
                raise Refused(Code.BAD_REQUEST, "invalid topic level")
            if not is_filter and level in _BAD_LEVEL:
                raise Refused(Code.BAD_REQUEST, "empty or wildcard topic level in a publish")
            if is_filter and ((level == "#" and i != len(levels) - 1) or ("#" in level or "+" in level)
                              and level not in ("#", "+")):
                raise Refused(Code.BAD_REQUEST, "'#' only as the last level, '+' only as a whole level")
        topic = f"devices/{device_id}/" + "/".join(levels)
        if len(topic.encode()) > 65535:
            raise Refused(Code.BAD_REQUEST, "topic too long")
        return topic

    def _check(self, request: Message, device_id: str, levels: tuple[str, ...]) -> _Publish:
        """Everything a publish must pass before it is stored (ACL, format, size, rate limit); Refused otherwise."""
        topic = self._topic(device_id, levels, is_filter=False)
        if not self._publish_allowed(device_id, topic):
            raise Refused(Code.FORBIDDEN, f"publish to {topic!r} not allowed")
        fmt = request.opt.content_format
        mime = None
        if fmt is not None:
            mime = CONTENT_TYPES.get(int(fmt))
            if mime is None:
                raise Refused(Code.UNSUPPORTED_CONTENT_FORMAT, "content formats: 50 (JSON), 60 (CBOR), 42 (octets)")
        if request.opt.block1 is not None:
            raise Refused(Code.REQUEST_ENTITY_TOO_LARGE, "block-wise transfer is not supported",
                          size1=self.settings.max_payload)
        payload = request.payload
        if len(payload) > self.settings.max_payload:
            raise Refused(Code.REQUEST_ENTITY_TOO_LARGE, f"payload over {self.settings.max_payload} bytes",
                          size1=self.settings.max_payload)
        if self.seen is not None:
            self.seen(device_id, request.remote)
        wait = self.admit(device_id, len(payload))
        if wait > 0:
            self.stats.rate_limited += 1
            raise Refused(Code.TOO_MANY_REQUESTS, "rate limit", max_age=max(1, math.ceil(wait)))
        tp = None
        if payload[:1] == b"{" and (mime is None or fmt == ContentFormat.JSON):
            tp = from_payload(payload)
        if tp is None:
            tp = new_traceparent()
        # Reliable: TCP/TLS always (RFC 8323 has no NON), a CON over UDP. NON: best-effort, answered at once.
        return _Publish(device_id, topic, payload, tp, msgpack.packb({"tp": tp} if mime is None else
                                                                      {"ct": mime, "tp": tp}),
                        request.mtype is not Type.NON)

    def _store(self, request: Message, pub: _Publish, on_commit: Callable[[bool], None] | None) -> None:
        """``outbox.submit`` (or the pipeline's), synchronous; a full or closing outbox is Refused 4.29 / 5.03."""
        try:
            pipeline = self.pipeline()
            qos = 1 if pub.reliable else 0
            if pipeline is None:
                self.outbox.submit(pub.device_id, pub.topic, pub.payload, qos, on_commit, pub.record_props)
            else:  # 0..n records (routes, transforms), quarantine for poison messages; on_commit once for all
                remote = request.remote
                identity = getattr(remote, "device_identity", None)
                tenant = pipeline.tenants.tenant(pub.device_id, identity.serial if identity else "",
                                                 lambda: _peercert(remote))
                pipeline.submit(self.outbox, pub.device_id, tenant, pub.topic, pub.payload, qos, on_commit,
                                pub.record_props)
        except OutboxFull as exc:
            self.stats.outbox_full += 1
            code = Code.TOO_MANY_REQUESTS if exc.reason == "device_share" else Code.SERVICE_UNAVAILABLE
            raise Refused(code, f"outbox full ({exc.reason})", max_age=self.settings.full_max_age) from None
        except OutboxError as exc:  # closing (the gateway stops), or the pipeline could not keep a poison message
            self.stats.outbox_full += 1
            raise Refused(Code.SERVICE_UNAVAILABLE, f"not stored: {exc}"[:120],
                          max_age=self.settings.full_max_age) from None

    def _flow(self, request: Message) -> Any:
        """The coaps+tcp connection or DTLS session (its DTLSRemote) of a reliable request, counted as awaiting its
        commit (None over plain UDP). Flow control: past max_inflight requests awaiting their commit, or while the
        outbox is congested, it is not read (as the MQTT listener does; DTLS drops its new requests)."""
        conn = request.remote if hasattr(request.remote, "request_started") else None
        if conn is not None:
            conn.request_started()
        return conn

    def _congested(self, conn: Any) -> None:
        if conn is not None and self.outbox.congested:
            conn.pause()
            self.outbox.when_decongested(conn.resume)

    def _answer_of(self, request: Message, pub: _Publish, ok: bool) -> Message:
        if not ok:
            self.stats.commit_failed += 1
            log.error("coap.commit_failed", device_id=pub.device_id, topic=pub.topic, trace_id=pub.tp[3:35])
            return Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"not stored: outbox commit failed")
        self.stats.published += 1
        return Message(code=Code.CREATED if request.code == Code.POST else Code.CHANGED)

    async def _publish(self, request: Message, device_id: str, levels: tuple[str, ...]) -> Message:
        """The publish as an aiocoap render (a request that did not take :meth:`publish_now`)."""
        pub = self._check(request, device_id, levels)
        if not pub.reliable:
            self._store(request, pub, None)
            return self._answer_of(request, pub, True)
        done = asyncio.get_running_loop().create_future()
        conn = self._flow(request)
        try:
            self._store(request, pub, _resolver(done))
            self._congested(conn)
            ok = await done
        finally:
            if conn is not None:
                conn.request_done()
        return self._answer_of(request, pub, ok)

    # --- publish without a task: the hot path ---------------------------------------------------------------------

    def publish_now(self, request: Message, answer: Answer) -> bool:
        """Serve a POST/PUT /ps/... now: checked and stored synchronously, answered through ``answer(request,
        response)`` from the outbox's ``on_commit`` (at once for a NON). False for any other request, which aiocoap
        then renders through :meth:`render_to_pipe`.

        Why: before a site sees a request aiocoap spends two Pipes, a task, a coroutine and a repr of the request on
        it, and the publish a future; none is needed for an answer that a callback can send (docs/COAP.md
        "Performance"). Same checks, same order, same answers as the rendered path."""
        code = request.code
        if code is not Code.POST and code is not Code.PUT:
            return False
        path = request.opt.uri_path
        if not path or path[0] != "ps":
            return False
        self.stats.requests += 1
        remote = request.remote
        try:
            pub = self._check(request, self._device_id(request), path[1:])
            if not pub.reliable:
                self._store(request, pub, None)
                answer(request, self._answer_of(request, pub, True))
                return True
            conn = self._flow(request)

            def on_commit(ok: bool) -> None:
                if conn is not None:
                    conn.request_done()
                answer(request, self._answer_of(request, pub, ok))

            try:
                self._store(request, pub, on_commit)
            except BaseException:
                if conn is not None:
                    conn.request_done()
                raise
            self._congested(conn)
        except Refused as exc:
            answer(request, self._refusal(request, exc))
            if getattr(remote, "refused", None) is not None and hasattr(remote, "close"):
                remote.close()  # one answer per connection of a refused device, then it is closed
        except Exception as exc:  # a bug costs this request a 5.00 (as aiocoap's render would)
            log.exception("coap.publish_crashed", peer=getattr(remote, "peer", None) or _hostinfo(remote),
                          error=repr(exc)[:200])
            answer(request, Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"internal error"))
        return True

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
        obs = _Observation(device_id, tuple(topic_filter.split("/")), pipe)
        mine.append(obs)
        self.stats.observations += 1
        conn = request.remote if hasattr(request.remote, "observing") else None
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
            mine.remove(obs)
            if not mine and self.observers.get(device_id) is mine:
                del self.observers[device_id]
            log.info("coap.observe_ended", device_id=device_id, topic_filter=topic_filter)
        return None  # pragma: no cover - the future never resolves

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

    # --- discovery -----------------------------------------------------------------------------------------------

    def _discovery(self, device_id: str) -> Message:
        """RFC 6690 links for what the ACL lets this device do under its namespace ``devices/{device_id}/``: ``ct``
        on what it may publish to, ``obs`` on what it may observe (one link when both)."""
        formats = " ".join(str(f) for f in CONTENT_TYPES)
        links: dict[str, list[str]] = {}
        if self.acl.open:
            links["/ps/%23"] = [f'ct="{formats}"', "obs"]
        for patterns, attr in ((self.acl.publish_patterns, f'ct="{formats}"'), (self.acl.subscribe_patterns, "obs")):
            for pattern in patterns:
                levels = [device_id if x == "{device_id}" else x for x in pattern]
                if len(levels) > 2 and levels[0] == "devices" and levels[1] == device_id:
                    href = "/ps/" + "/".join("%23" if x == "#" else "%2B" if x == "+" else x for x in levels[2:])
                    attrs = links.setdefault(href, [])
                    if attr not in attrs:
                        attrs.append(attr)
        body = ",".join(['</ps>;rt="core.ps";ct=40',
                         *(f'<{href}>;rt="core.ps.data";' + ";".join(attrs) for href, attrs in links.items())])
        return Message(code=Code.CONTENT, payload=body.encode(), content_format=ContentFormat.LINKFORMAT)


def _resolver(future: asyncio.Future[bool]) -> Callable[[bool], None]:
    def on_commit(ok: bool) -> None:
        if not future.done():  # the request may have been cancelled (connection gone) meanwhile
            future.set_result(ok)
    return on_commit


def _peercert(remote: Any) -> dict | None:
    """The verified client certificate of a coaps+tcp or DTLS remote (for a tenant from its O/OU); None otherwise."""
    # The one reading shared with the limiter's classes (edgegw/policy/certattrs.py).
    from edgegw.policy.certattrs import peercert_of
    return peercert_of(remote)


def _hostinfo(remote: Any) -> str | None:
    try:
        return str(remote.hostinfo)
    except Exception:  # noqa: BLE001 - only for a log line
        return None
