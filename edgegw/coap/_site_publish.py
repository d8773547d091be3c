"""Publishing through the CoAP site, mixed into :class:`~edgegw.coap.site.PubSubSite`: the checks (ACL, content
format, size, rate limit), the store (``outbox.submit``, or the pipeline's), flow control, the 2.01/2.04 once the
record is committed; as an aiocoap render and, the hot path, without a task (:meth:`Publishing.publish_now`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.types import Type

from edgegw.coap._site_requests import Refused, RequestChecks, _hostinfo
from edgegw.config import CoAPSettings
from edgegw.errors import OutboxError
from edgegw.outbox._record import OutboxFull
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL
from edgegw.tracing import from_payload, new_traceparent

log = structlog.get_logger("edgegw.coap")

Admit = Callable[[str, int], float]
"""The rate-limit seam: ``admit(device_id, payload_bytes)`` -> seconds until this request would be allowed,
0 = go now. Answered 4.29 Too Many Requests with Max-Age = ceil(seconds). Called once per publish, synchronously."""

Answer = Callable[[Message, Message], None]
"""``answer(request, response)``: sends ``response`` to ``request`` through aiocoap's token interface (set by
:class:`edgegw.coap._fastpath.PublishTokenManager`)."""

PipelineOf = Callable[[], Any]
"""Returns the running :class:`edgegw.pipeline.engine.Pipeline` (routes, transforms, tenants), or None: records
stored as sent. A callable, so the pipeline the MQTT listener gets on reload is the one CoAP uses too."""


CONTENT_TYPES: dict[int, str] = {
    int(ContentFormat.JSON): "application/json",
    int(ContentFormat.CBOR): "application/cbor",
    int(ContentFormat.OCTETSTREAM): "application/octet-stream",
}
"""Content formats accepted on publish, and the MIME type stored as the record's ``ct`` (sent upstream as the MQTT 5
Content Type). A request without Content-Format is stored without ``ct``."""

_ACL_MEMO = 4096
_ACL_MEMO_TOPIC = 256


@dataclass(frozen=True, slots=True)
class _Publish:
    """A publish that passed its checks: what is stored, and what its answer and log lines need."""
    device_id: str
    topic: str
    payload: bytes
    tp: str
    record_props: bytes
    reliable: bool


class Publishing(RequestChecks):
    """Mixed into :class:`~edgegw.coap.site.PubSubSite` (which sets these attributes)."""

    settings: CoAPSettings
    outbox: Outbox
    _acl: ACL
    _may_publish: dict[tuple[str, str], bool]
    admit: Admit
    pipeline: PipelineOf
    seen: Callable[[str, Any], None] | None

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

    # --- publish -------------------------------------------------------------------------------------------------

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
