"""What every request to the CoAP site goes through, mixed into :class:`~edgegw.coap.site.PubSubSite`: who asks
(the verified device id, or a refusal), the topic or filter its ``/ps`` path names, and the error answer
(:class:`Refused`, logged as ``coap.request_refused``); and the site's counters (:class:`CoAPStats`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiocoap import Message
from aiocoap.numbers.codes import Code

from edgegw.identity import DeviceIdentity

log = structlog.get_logger("edgegw.coap")

Authorizer = Callable[[DeviceIdentity], "str | None"]

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
    notifications_dropped_backlog: int = 0
    """Commands not written to an observer whose coaps+tcp connection does not read (write buffer past its
    high-water mark), as MQTT drops QoS 0 deliveries to a backlogged device."""


class Refused(Exception):
    """A request answered with an error code (and logged)."""

    def __init__(self, code: Code, why: str, max_age: int | None = None, size1: int | None = None) -> None:
        super().__init__(why)
        self.code = code
        self.why = why
        self.max_age = max_age
        self.size1 = size1


class RequestChecks:
    """Mixed into :class:`~edgegw.coap.site.PubSubSite` (which sets these attributes)."""

    stats: CoAPStats
    authorizer: Authorizer | None
    is_lab: Callable[[Any], bool]

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


def _hostinfo(remote: Any) -> str | None:
    try:
        return str(remote.hostinfo)
    except Exception:  # noqa: BLE001 - only for a log line
        return None
