"""A simulated CoAP device: coaps+tcp (RFC 8323) with its own client certificate, confirmable-style POSTs.

The same :class:`~edgegw.sim.device.Device` (window, backlog, reconnects, chaos, counters, seqs); only the wire
differs. Over TCP there are no CON/ACK messages: every request gets exactly one response, matched by its token,
so a 2.01/2.04 response is the acknowledgement (edgegw sends it after the outbox commit, docs/COAP.md) and a
4.xx/5.xx response is a refusal. The session is up when the gateway's CSM arrives (RFC 8323 §5.3); keep-alive is a
Ping (7.02) answered with a Pong.

``POST /ps/{rest}`` publishes to ``devices/{device_id}/{rest}``, so the topic must be ``devices/{device_id}/...``.
The frames are built here (a few lines of RFC 8323 §3.2 and RFC 7252 §3.1), not with aiocoap's private
serializer: one prebuilt options block per device, the payload appended per message.
"""

from __future__ import annotations

from typing import Any

from edgegw.sim.device import Device

_CSM, _PING, _PONG, _RELEASE, _ABORT = 0xE1, 0xE2, 0xE3, 0xE4, 0xE5
_POST = 0x02
_URI_PATH, _CONTENT_FORMAT = 11, 12
_JSON = 50
_MAX_FRAME = 64 * 1024


class CoapProtocolError(Exception):
    pass


def coap_path(topic: str, device_id: str) -> list[str]:
    """``devices/{id}/a/b`` -> ``["ps", "a", "b"]``; ValueError for any other topic (the gateway maps nothing else)."""
    prefix = f"devices/{device_id}/"
    if not topic.startswith(prefix) or topic == prefix:
        raise ValueError(f"a CoAP device publishes under devices/{{device_id}}/..., not {topic!r}")
    return ["ps", *topic[len(prefix):].split("/")]


def _ext(value: int) -> tuple[int, bytes]:
    """A CoAP nibble and its extension bytes (RFC 7252 §3.1: 13 -> +1 byte, 14 -> +2 bytes)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):  # stable: Uri-Path segments keep their order
        delta, delta_ext = _ext(number - last)
        length, length_ext = _ext(len(value))
        out += bytes(((delta << 4) | length,)) + delta_ext + length_ext + value
        last = number
    return bytes(out)


def encode_frame(code: int, token: bytes, options: bytes = b"", payload: bytes = b"") -> bytes:
    """One CoAP-over-TCP message (RFC 8323 §3.2): Len/TKL, extended length, code, token, options, payload."""
    body = options + (b"\xff" + payload if payload else b"")
    n = len(body)
    if n < 13:
        head = bytes(((n << 4) | len(token),))
    elif n < 269:
        head = bytes(((13 << 4) | len(token), n - 13))
    elif n < 65805:
        head = bytes(((14 << 4) | len(token),)) + (n - 269).to_bytes(2, "big")
    else:
        head = bytes(((15 << 4) | len(token),)) + (n - 65805).to_bytes(4, "big")
    return head + bytes((code,)) + token + body


def next_frame(buffer: bytearray) -> tuple[int, bytes] | None:
    """Take one whole message off ``buffer``: (code, token); None until one is complete."""
    if not buffer:
        return None
    first = buffer[0]
    nibble, tkl = first >> 4, first & 0x0F
    ext = {13: 1, 14: 2, 15: 4}.get(nibble, 0)
    if tkl > 8:
        raise CoapProtocolError(f"token length {tkl} (at most 8)")
    if len(buffer) < 1 + ext:
        return None
    length = nibble if not ext else int.from_bytes(buffer[1:1 + ext], "big") + {1: 13, 2: 269, 4: 65805}[ext]
    total = 1 + ext + 1 + tkl + length
    if total > _MAX_FRAME:
        raise CoapProtocolError(f"a {total}-byte message from the gateway")
    if len(buffer) < total:
        return None
    code = buffer[1 + ext]
    token = bytes(buffer[2 + ext:2 + ext + tkl])
    del buffer[:total]
    return code, token


class CoapDevice(Device):
    """A :class:`Device` speaking coaps+tcp; see the module docstring. ``protocol`` is ignored."""

    def __init__(self, device_id: str, host: str, port: int, ssl_context: Any, **options: Any) -> None:
        super().__init__(device_id, host, port, ssl_context, **options)
        path = coap_path(self.topic, device_id)
        self._options = encode_options([*((_URI_PATH, p.encode()) for p in path),
                                        (_CONTENT_FORMAT, bytes((_JSON,)))])
        self._buffer = bytearray()

    def _encode(self, pid: int, payload: bytes) -> bytes:
        return encode_frame(_POST, pid.to_bytes(2, "big"), self._options, payload)

    def _redelivery(self, frame: bytes) -> bytes:
        return frame  # a new connection: the same token cannot be confused with anything

    def _hello(self) -> bytes:
        self._buffer = bytearray()
        return encode_frame(_CSM, b"")

    def _ping(self) -> bytes:
        return encode_frame(_PING, b"")

    def _goodbye(self) -> bytes:
        return encode_frame(_RELEASE, b"")

    def _on_data(self, data: bytes) -> None:
        assert self._loop is not None
        self._last_rx = self._loop.time()
        self._buffer += data
        acked = False
        try:
            while (message := next_frame(self._buffer)) is not None:
                code, token = message
                if code == _CSM:
                    if not self.connected and self._connack is not None and not self._connack.done():
                        self._session_up()
                elif code == _PING:
                    if self._transport is not None:
                        self._transport.write(encode_frame(_PONG, token))
                elif code in (_RELEASE, _ABORT):
                    self._set_lost(f"{'Release' if code == _RELEASE else 'Abort'} from gateway")
                elif code >> 5 in (2, 4, 5) and len(token) == 2:  # a response: 2.xx stored, 4.xx/5.xx refused
                    acked |= self._on_ack(int.from_bytes(token, "big"), code >> 5 == 2)
        except CoapProtocolError as exc:
            self._set_lost(f"protocol error from gateway: {exc}")
            if self._transport is not None:
                self._transport.abort()
            return
        if acked:
            self.pump()
