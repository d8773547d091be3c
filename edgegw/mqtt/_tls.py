"""Device-facing TLS without asyncio's ``SSLProtocol``: a non-blocking :class:`ssl.SSLSocket` driven by the loop.

Why (BRIEF §2, issue #3 item 7): asyncio's TLS keeps, per connection, a read buffer of ``SSLProtocol.max_size``
(256 KiB by default) plus two memory BIOs that keep the size of the largest chunk they ever held. Idle, that is
~51 KB per mTLS connection at 16 KiB and ~40 KB at 4 KiB. Here OpenSSL reads and writes the socket itself (a
socket BIO, as mosquitto does): CPython sets ``SSL_MODE_RELEASE_BUFFERS`` on every context, so an idle connection
holds no TLS buffer at all, and decrypted bytes go through one scratch buffer shared by every connection (the
loop is single-threaded; the bytes are copied out before the protocol sees them). Measured on a bare server with
1,000 idle mTLS connections: 26 KB each, against 51 KB with ``start_tls`` (mosquitto: 25 KB).

What the transport keeps from asyncio's: the handshake is ours to time out and to report (who, and why), the
protocol sees an ordinary :class:`asyncio.Transport` (``pause_reading``/``resume_reading``, write flow control
with high/low water marks, ``close`` after the buffered output, ``abort``), and ``get_extra_info("ssl_object")``
answers ``getpeercert()`` for the identity. The context is the caller's at accept time, so a reloaded context
applies to the next handshake.

The listening side is :mod:`edgegw.mqtt._tls_listener` and OpenSSL's read-ahead :mod:`edgegw.mqtt._read_ahead`;
both names are importable from here as before.

The same transport drives the client side of the uplink (``server_hostname=``, :mod:`edgegw.uplink._mqtt_client`):
there asyncio's ``sslproto`` ran pure Python per read and per write (~20-27 % of the event loop under load), here
OpenSSL writes the socket itself and the loop only sees ``send``/``recv_into`` calls.
"""

from __future__ import annotations

import _ssl
import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from edgegw.mqtt._read_ahead import enable_read_ahead, read_ahead
from edgegw.mqtt._tls_listener import TLSListener

__all__ = ["CLOSE_TIMEOUT", "HIGH_WATER", "LOW_WATER", "READ_BUDGET", "HandshakeDone", "TLSListener", "TLSTransport",
           "read_ahead"]

log = structlog.get_logger("edgegw.mqtt")

HIGH_WATER = 64 * 1024
"""Default write buffer limits (asyncio's): the protocol is asked to pause writing above, resumed at or below."""
LOW_WATER = 16 * 1024
COALESCE_MAX = 16 * 1024
"""Bytes queued behind a blocked write joined into one OpenSSL write at most (:meth:`TLSTransport._flush`): a TLS
record holds 16 KiB, so joining more saves no record, and keeps ``sent`` from moving while a slow peer reads."""
READ_BUDGET = 256 * 1024
"""Plaintext bytes read from one connection per loop wake-up (asyncio reads up to 256 KiB per wake-up too), so a
device that sends without pause cannot keep the loop from the others."""
CLOSE_TIMEOUT = 30.0
"""Seconds ``close()`` waits for buffered output to reach a peer that does not read, before it aborts (asyncio's
``ssl_shutdown_timeout``): a device that stops reading cannot keep a closed connection alive."""


def _direct_io(sock: ssl.SSLSocket) -> Any:
    """What the read and write loops call ``read(n, buffer)`` and ``write(data)`` on: the ``_ssl._SSLSocket`` inside
    ``sock`` when it is one, else ``sock`` itself (same calls, same results). The wrapper's ``recv_into``/``send``
    add two Python calls and a closed check per TLS record, and a device writes each PUBLISH as its own record:
    ~1 us per message on the loop. Its one other duty, turning a ragged EOF (no close_notify) into a 0-byte read,
    is the read loop's ``except ssl.SSLEOFError``."""
    inner = getattr(sock, "_sslobj", None)
    return inner if inner is not None and type(inner) is getattr(_ssl, "_SSLSocket", None) else sock


HandshakeDone = Callable[["TLSTransport", BaseException | None], None]
"""Called once per connection: ``(transport, None)`` when the handshake succeeded (before the protocol's
``connection_made``), or ``(transport, exc)`` when it failed or timed out; the socket is closed by then and the
protocol hears nothing."""


# Transport states.
_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)


class TLSTransport(asyncio.Transport):
    """One TLS connection over a non-blocking socket (see the module docstring): the server side of an accepted
    socket, or, with ``server_hostname``, the client side of a connected one (the handshake then starts at once:
    the client speaks first, and the certificate is checked against ``server_hostname``).

    The selector registrations follow from a few flags (:meth:`_update`): OpenSSL may ask for the socket to be
    writable to go on reading, or readable to go on writing (a renegotiation), and a write it could not finish
    must be retried with the same bytes.
    """

    __slots__ = ("_close_timeout", "_fd", "_high", "_hs_write", "_io", "_loop", "_low", "_on_handshake", "_protocol",
                 "_raw_pending", "_read_waits_write", "_reader_on", "_reading", "_scratch", "_send_blocked", "_sock",
                 "_state", "_timer", "_wbuf", "_write_paused", "_write_waits_read", "_writer_on", "_wsize",
                 "read_ahead", "sent")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, protocol: asyncio.Protocol,
                 scratch: memoryview, *, handshake_timeout: float, on_handshake: HandshakeDone,
                 close_timeout: float = CLOSE_TIMEOUT, server_hostname: str | None = None) -> None:
        # Not asyncio.BaseTransport.__init__: it makes an ``_extra`` dict per connection; get_extra_info computes.
        self._extra = None
        self._loop = asyncio.get_running_loop()
        self._protocol = protocol
        self._scratch = scratch
        """Shared by every connection of the server: decrypted bytes land here and are copied out at once."""
        self._on_handshake: HandshakeDone | None = on_handshake
        self._state = _HANDSHAKE
        self._reading = True  # the protocol's wish (pause_reading / resume_reading)
        self._reader_on = self._writer_on = False
        self._wbuf: list[bytes] = []
        """Plaintext OpenSSL has not taken yet; ``_wbuf[0]`` is the write it asked to be retried as is."""
        self._wsize = 0
        self.sent = 0
        """Plaintext bytes OpenSSL took (a count that only grows): how far a peer that reads slowly got, which the
        buffer's size cannot say while more is written to it (mqtt/device.py ``_output_drains``)."""
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._write_paused = False
        self._hs_write = self._send_blocked = False
        self._read_waits_write = self._write_waits_read = False
        self._close_timeout = close_timeout
        self.read_ahead = False
        """True if OpenSSL reads ahead on this connection (:func:`read_ahead`)."""
        self._raw_pending: Callable[[], int] | None = None
        self._io: Any = None
        """``read``/``write`` of the open connection (:func:`_direct_io`); None once torn down."""
        # The handshake deadline, then (while closing with output still buffered) the close deadline.
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(handshake_timeout, self._handshake_timeout)
        self._fd = sock.fileno()
        try:
            if server_hostname is None:
                self._sock: ssl.SSLSocket | None = context.wrap_socket(sock, server_side=True,
                                                                       do_handshake_on_connect=False)
            else:
                self._sock = context.wrap_socket(sock, server_hostname=server_hostname,
                                                 do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:  # e.g. the peer is already gone (getpeername fails)
            self._sock = None
            sock.close()
            self._loop.call_soon(self._handshake_failed, exc)
            return
        self._io = _direct_io(self._sock)
        self.read_ahead, self._raw_pending = enable_read_ahead(self._sock)
        # The handshake never starts inside this constructor: the caller hears of the outcome only through
        # ``on_handshake``, after it has stored the transport. A server waits for the ClientHello; a client sends
        # it on the next loop iteration.
        if server_hostname is None:
            self._update()
        else:
            self._loop.call_soon(self._start_handshake)

    # --- handshake -----------------------------------------------------------------------------------------

    def _start_handshake(self) -> None:
        if self._state == _HANDSHAKE and self._sock is not None:  # not aborted in the meantime
            self._handshake()

    def _handshake(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._hs_write = False
            self._update()
            return
        except ssl.SSLWantWriteError:
            self._hs_write = True
            self._update()
            return
        except ssl.SSLEOFError as exc:
            # The peer closed the TCP connection mid-handshake: say that, not an OpenSSL reason string.
            lost = ConnectionResetError("peer closed the connection during the TLS handshake")
            lost.__cause__ = exc
            self._handshake_failed(lost)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError (certificate, protocol) is an OSError
            self._handshake_failed(exc)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._state = _OPEN
        done, self._on_handshake = self._on_handshake, None
        try:
            if done is not None:
                done(self, None)
            if self._state != _OPEN:  # the callback turned it away (closed or aborted)
                return
            self._protocol.connection_made(self)
        except Exception as exc:  # noqa: BLE001 - as in data_received
            self._protocol_failed("connection_made", exc)
            return
        self._update()
        if self._state == _OPEN and self._reading:
            self._read()  # TLS 1.3: the first application data may have come with the client's Finished

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._handshake_failed(TimeoutError("TLS handshake timed out"))

    def _handshake_failed(self, exc: BaseException) -> None:
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self._teardown()
        done, self._on_handshake = self._on_handshake, None
        if done is not None:
            done(self, exc)

    # --- reading -------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
            return
        if self._write_waits_read:
            self._write_waits_read = False
            self._flush()
        if self._state == _OPEN and self._reading and not self._read_waits_write:
            self._read()

    def _read(self) -> None:
        assert self._sock is not None
        read = self._io.read
        scratch = self._scratch
        size = len(scratch)
        protocol = self._protocol
        raw_pending = self._raw_pending
        budget = READ_BUDGET
        while self._reading and self._state == _OPEN:
            # Every record OpenSSL can give us now, up to the scratch size, goes to the protocol in one call: a
            # device writes each PUBLISH as its own TLS record and SSL_read returns one record at a time, so one
            # data_received per record would cost a parse, an event list and a flush per message.
            got = 0
            stop: BaseException | None = None
            while got < size:
                try:
                    n = read(size - got, scratch[got:] if got else scratch)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLEOFError:  # the peer closed without close_notify: an end, as SSLSocket.read says
                    stop = EOFError()
                    break
                except (OSError, ValueError) as exc:  # SSLWantWriteError, a fatal error
                    stop = exc
                    break
                if n == 0:
                    stop = EOFError()
                    break
                got += n
                if raw_pending is not None and not raw_pending():
                    break  # OpenSSL holds nothing more: its read emptied the socket (no EAGAIN read to learn it)
            if got:
                try:
                    protocol.data_received(bytes(scratch[:got]))
                except Exception as exc:  # noqa: BLE001 - a bug on the protocol's side ends this connection only
                    self._protocol_failed("data_received", exc)
                    return
                if self._state != _OPEN:
                    return  # the protocol closed or aborted the connection: what follows is not ours to report
            if stop is not None:
                if isinstance(stop, ssl.SSLWantWriteError):  # OpenSSL must send first (renegotiation), socket full
                    self._read_waits_write = True
                    self._update()
                elif isinstance(stop, EOFError):
                    self._eof()
                else:
                    self._fatal(stop)  # type: ignore[arg-type]
                return
            if got < size:
                return  # SSLWantReadError: the socket is drained
            budget -= got
            if budget <= 0:
                # Our turn is over. What OpenSSL already read (decrypted, or read ahead and not yet decrypted:
                # pending() does not count that) would not make the socket readable again.
                if self._reading and self._state == _OPEN:
                    self._loop.call_soon(self._read_again)
                return

    def _read_again(self) -> None:
        if self._state == _OPEN and self._reading and not self._read_waits_write:
            self._read()

    def _eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:  # noqa: BLE001 - as in data_received
            self._protocol_failed("eof_received", exc)
            return
        if keep_open:
            log.debug("tls.half_close_ignored")  # TLS cannot be half closed: close_notify ends both directions
        self.close()

    def pause_reading(self) -> None:
        if self._state != _OPEN or not self._reading:
            return
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        if self._state != _OPEN or self._reading:
            return
        self._reading = True
        self._update()
        # Records OpenSSL already holds would not make the socket readable: look on the next iteration.
        self._loop.call_soon(self._read_again)

    def is_reading(self) -> bool:
        return self._state == _OPEN and self._reading

    # --- writing -------------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expected a bytes-like object, got {type(data).__name__}")
        if self._state != _OPEN or not data:
            return  # closing or closed: asyncio drops late writes too
        self._wbuf.append(bytes(data))
        self._wsize += len(data)
        if not (self._send_blocked or self._write_waits_read):
            self._flush()
        if not self._write_paused and self._wsize > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def _flush(self) -> None:
        """Hand buffered plaintext to OpenSSL until all of it is sent or the socket is full."""
        write = self._io.write if self._sock is not None else None
        wbuf = self._wbuf
        while wbuf and write is not None:
            if len(wbuf) > 2:
                # Coalesce what queued behind the head (the head itself must be retried exactly as it was), up to
                # COALESCE_MAX: OpenSSL takes a write whole or not at all, so ``sent`` moves once per write, and a
                # slow reader must be seen making progress in less than its keep-alive (mqtt/_flow.output_mark).
                end, size = 1, 0
                while end < len(wbuf) and size < COALESCE_MAX:
                    size += len(wbuf[end])
                    end += 1
                if end > 2:
                    wbuf[1:end] = [b"".join(wbuf[1:end])]
            data = wbuf[0]
            try:
                write(data)  # all of it or nothing: CPython does not enable partial writes
            except ssl.SSLWantWriteError:
                self._send_blocked = True
                self._update()
                return
            except ssl.SSLWantReadError:  # a renegotiation must read first
                self._write_waits_read = True
                self._update()
                return
            except (OSError, ValueError) as exc:
                self._fatal(exc)
                return
            del wbuf[0]
            self._wsize -= len(data)
            self.sent += len(data)
        self._send_blocked = False
        self._update()
        if self._write_paused and self._wsize <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()
        if self._state == _CLOSING and not wbuf:
            self._finish_close()

    def _on_writable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
            return
        if self._read_waits_write:
            self._read_waits_write = False
            self._update()
            self._read_again()
        if self._send_blocked and self._state in (_OPEN, _CLOSING):
            self._flush()

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self._write_paused and self._wsize > high:
            self._write_paused = True
            self._protocol.pause_writing()
        elif self._write_paused and self._wsize <= low:
            self._write_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half closed")

    # --- closing -------------------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._state == _CLOSING or self._state == _CLOSED

    def close(self) -> None:
        """Stop reading; send what is buffered, then close_notify, then close the socket."""
        if self._state == _HANDSHAKE:
            self._handshake_failed(ConnectionAbortedError("closed by the gateway during the TLS handshake"))
            return
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._reading = False
        if self._wbuf:
            self._update()  # the buffered output goes first; _flush finishes the close
            self._timer = self._loop.call_later(self._close_timeout, self._close_timed_out)
            return
        self._finish_close()

    def _close_timed_out(self) -> None:
        self._timer = None
        if self._state == _CLOSING:
            log.debug("tls.close_timeout", buffered=self._wsize)
            self._lost(None)

    def _finish_close(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.unwrap()  # one non-blocking attempt: our close_notify goes out, the peer's is not awaited
            except (OSError, ValueError):
                pass
        self._lost(None)

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake_failed(ConnectionAbortedError("aborted by the gateway during the TLS handshake"))
        elif self._state != _CLOSED:
            self._lost(None)

    def _fatal(self, exc: Exception) -> None:
        log.debug("tls.connection_error", error=repr(exc))
        self._lost(exc)

    def _protocol_failed(self, callback: str, exc: Exception) -> None:
        log.error("tls.protocol_callback_failed", callback=callback, error=repr(exc), exc_info=exc)
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._teardown()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def _teardown(self) -> None:
        self._update()  # state is _CLOSED: unregisters both
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wbuf.clear()
        self._wsize = 0
        sock, self._sock = self._sock, None
        self._io = None
        if sock is not None:
            sock.close()

    # --- selector registration -----------------------------------------------------------------------------

    def _update(self) -> None:
        """Register for exactly what the current state waits on."""
        state = self._state
        if state == _HANDSHAKE:
            read, write = not self._hs_write, self._hs_write
        elif state == _CLOSED:
            read = write = False
        else:
            read = (state == _OPEN and self._reading and not self._read_waits_write) or self._write_waits_read
            write = self._send_blocked or self._read_waits_write
        loop = self._loop
        if read != self._reader_on:
            self._reader_on = read
            if read:
                loop.add_reader(self._fd, self._on_readable)
            else:
                loop.remove_reader(self._fd)
        if write != self._writer_on:
            self._writer_on = write
            if write:
                loop.add_writer(self._fd, self._on_writable)
            else:
                loop.remove_writer(self._fd)

    # --- the rest of asyncio.Transport ---------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if sock is None:
            return default
        try:
            if name == "ssl_object":
                return sock  # getpeercert(), cipher(), version(), as asyncio's SSLObject answers them
            if name == "peercert":
                return sock.getpeercert()
            if name == "cipher":
                return sock.cipher()
            if name == "sslcontext":
                return sock.context
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
            if name == "socket":
                return sock
        except OSError:
            return default
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def __repr__(self) -> str:
        return f"<TLSTransport fd={self._fd} {('handshake', 'open', 'closing', 'closed')[self._state]}>"
