"""Opening the native uplink client's connection (:mod:`edgegw.uplink._mqtt_client`): TCP to the first address of
the host that answers, then TLS on edgegw's own transport, client side (:class:`edgegw.mqtt._tls.TLSTransport`
with ``server_hostname``), instead of ``loop.create_connection(ssl=...)`` and asyncio's pure-Python ``sslproto``.

The caller bounds the whole with its ``connect_timeout`` (``asyncio.timeout``); the handshake is also bounded by the
transport itself, so a peer that accepts TCP and never answers the ClientHello ends the attempt either way. A
cancelled or timed-out attempt leaves no socket behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Any

from edgegw.mqtt._tls import TLSTransport


async def open_tls(loop: asyncio.AbstractEventLoop, host: str, port: int, context: ssl.SSLContext,
                   server_hostname: str, protocol: asyncio.Protocol, scratch: memoryview, *, deadline: float,
                   close_timeout: float) -> TLSTransport:
    """Connect, hand the socket to a client-side :class:`TLSTransport` and wait for its handshake; the
    protocol's ``connection_made`` has run when this returns. Raises the OSError (``ssl.SSLError``,
    ``ssl.SSLCertVerificationError``, ``ConnectionRefusedError``, ...) or ``TimeoutError`` (the handshake took
    past ``deadline``, in ``loop.time()``) that ended the attempt."""
    sock = await _tcp_connect(loop, host, port)
    done: asyncio.Future[BaseException | None] = loop.create_future()

    def on_handshake(transport: TLSTransport, exc: BaseException | None) -> None:
        if not done.done():
            done.set_result(exc)

    transport = TLSTransport(sock, context, protocol, scratch, handshake_timeout=max(0.001, deadline - loop.time()),
                             on_handshake=on_handshake, close_timeout=close_timeout,
                             server_hostname=server_hostname)
    try:
        exc = await done
    except BaseException:  # cancelled, or the caller's timeout: the socket must not outlive the attempt
        transport.abort()
        raise
    if exc is not None:
        raise exc
    return transport


async def _tcp_connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to the first address of ``host`` that answers (as
    ``loop.create_connection`` does, without its transport); raises the OSError of the address that failed, or
    one naming every address's error when they differ (asyncio's "Multiple exceptions")."""
    infos: list[tuple[Any, ...]]
    try:  # an address needs no resolver thread (asyncio skips it too)
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no address")
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio does for TCP transports
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    if len({str(e) for e in errors}) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")
