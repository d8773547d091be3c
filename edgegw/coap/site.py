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

Where the code is: this module holds :class:`PubSubSite` (its state, dispatch by path, discovery) and is the import
path of the names in ``__all__``. The site's methods of one job each are in mixins: ``_site_requests.py`` (the device
id, topics from the path, error answers: :class:`Refused`; :class:`CoAPStats`), ``_site_publish.py`` (publish:
checks, store, the answer after the commit, :meth:`~PubSubSite.publish_now`), ``_site_observe.py`` (GET + Observe,
:meth:`~PubSubSite.deliver`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from edgegw.coap._site_observe import Observing, _Observation
from edgegw.coap._site_publish import (
    CONTENT_TYPES,
    Admit,
    Answer,
    PipelineOf,
    Publishing,
)
from edgegw.coap._site_requests import Authorizer, CoAPStats, Refused
from edgegw.config import CoAPSettings
from edgegw.outbox.store import Outbox
from edgegw.policy.acl import ACL

__all__ = ["CONTENT_TYPES", "Admit", "Answer", "Authorizer", "CoAPStats", "PipelineOf", "PubSubSite", "Refused",
           "always_admit"]


def always_admit(device_id: str, nbytes: int) -> float:
    return 0.0


class PubSubSite(Publishing, Observing, interfaces.Resource):
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
        self.end_disallowed_observations()

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
