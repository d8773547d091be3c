"""Publishes answered without aiocoap's per-request machinery: a TokenManager that offers each incoming request to
the site's synchronous :meth:`~edgegw.coap.site.PubSubSite.publish_now` first.

aiocoap's ``TokenManager.process_request`` builds, for every request, a Pipe, a second Pipe (``error_to_message``),
a task running the site's coroutine (named with a ``repr`` of the request), closures and an ``incoming_requests``
entry; the site then awaited a future resolved by the outbox's ``on_commit``. A publish needs none of it: its answer
is known when the group commit holding it ends, so ``on_commit`` sends it. The answer goes down exactly as aiocoap's
``on_event`` sends a response (token, response address, ``request`` for piggy-backing, the token interface's
``send_message``), so coaps+tcp framing, No-Response, and the UDP/DTLS message layer's ACK handling are aiocoap's.

A request whose (token, remote) is still in ``incoming_requests`` (e.g. a publish reusing an observation's token)
takes aiocoap's path, which ends the older request first, as RFC 7641 wants.

Private aiocoap API used (pinned: aiocoap==0.4.17): ``TokenManager.incoming_requests``, ``token_interface``.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiocoap import Message
from aiocoap.tokenmanager import TokenManager

log = structlog.get_logger("edgegw.coap")


class PublishTokenManager(TokenManager):
    """aiocoap's TokenManager, with publishes served by ``site.publish_now`` (any object with that method)."""

    def __init__(self, context: Any, site: Any) -> None:
        super().__init__(context)
        self._publish_now = site.publish_now

    def process_request(self, request: Message) -> None:
        incoming = self.incoming_requests
        if (incoming is not None and (request.token, request.remote) not in incoming
                and self._publish_now(request, self._answer)):
            return
        super().process_request(request)

    def _answer(self, request: Message, response: Message) -> None:
        # As TokenManager.process_request's on_event does for a rendered response.
        response.token = request.token
        response.remote = request.remote.as_response_address()
        response.request = request
        try:
            self.token_interface.send_message(response, _no_interest)
        except Exception as exc:  # noqa: BLE001 - runs in the outbox's on_commit: a dead remote must not stop it
            log.warning("coap.response_failed", error=repr(exc)[:200], code=str(response.code))


def _no_interest() -> None:
    """The message-error monitor of a publish's answer: nothing waits on it (aiocoap passes the Pipe's stopper)."""
