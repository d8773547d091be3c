"""``SSL_set_read_ahead`` for a :class:`ssl.SSLSocket`, which the ``ssl`` module does not offer: through ctypes, on
the ``SSL *`` of CPython's ``_ssl._SSLSocket``, and only where that private layout was verified (:func:`read_ahead`).

Used by :class:`edgegw.mqtt._tls.TLSTransport` on every accepted connection; anywhere it cannot be applied the
connection works the same, with two reads per TLS record instead of one per wake-up.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
import sys
import weakref
from collections.abc import Callable
from typing import Any

_SSL_CTRL_SET_READ_AHEAD = 41  # openssl/ssl.h: SSL_set_read_ahead(s, 1) is SSL_ctrl(s, 41, 1, NULL)


@functools.cache
def _openssl() -> tuple[Any, Any] | None:
    """``SSL_ctrl`` and ``SSL_get_options`` of the OpenSSL that the ``ssl`` module is linked against (looked up
    through ``_ssl``'s own handle, so never another copy), or None where that cannot be done."""
    if sys.implementation.name != "cpython":
        return None
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        ctrl, get_options = lib.SSL_ctrl, lib.SSL_get_options
    except (OSError, AttributeError):
        return None
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    return ctrl, get_options


@functools.cache
def _has_pending() -> Any:
    """``SSL_has_pending`` (OpenSSL >= 1.1.0) of that same OpenSSL, or None."""
    try:
        func = ctypes.CDLL(_ssl.__file__).SSL_has_pending
    except (OSError, AttributeError):
        return None
    func.restype, func.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return func


_VERIFIED_LAYOUTS = frozenset({("cpython", (3, 11))})
"""Interpreters on which :func:`read_ahead` may read ``_ssl._SSLSocket``'s private fields: the layout
(``PyObject_HEAD``, ``PyObject *Socket`` (a weak reference to the ssl.SSLSocket), ``SSL *ssl``) was checked in
``Modules/_ssl.c`` and tests/test_tls_transport.py ran there. Add a version only after running that test on it;
anywhere else read-ahead stays off (correct, only dearer)."""


def read_ahead(sock: ssl.SSLSocket) -> bool:
    """Let OpenSSL read whatever the socket holds into its record buffer (``SSL_set_read_ahead``).

    Without it OpenSSL reads each record with two ``read`` calls (the 5-byte header, then the body), and a device
    writes each PUBLISH as its own record: two syscalls per message. With it, one ``read`` per wake-up. The
    ``ssl`` module has no setting for it, so the ``SSL *`` is read from a private field of CPython's
    ``_ssl._SSLSocket``: a memory layout, not an API. A wrong guess would hand OpenSSL a bad pointer (a crash, not
    an exception), so nothing is dereferenced unless every check passes: the interpreter is in
    :data:`_VERIFIED_LAYOUTS`, the object is large enough to hold both fields, and the field before the ``SSL *``
    is, by address, the weak reference to ``sock`` that ``_ssl`` keeps (``weakref.ref(sock)`` returns that very
    object), which proves the offsets without following any pointer. Only then is ``SSL_get_options`` asked and
    compared with the context's options, as a last check. Otherwise nothing is changed: reads are just dearer.
    True if read-ahead is on.
    """
    return enable_read_ahead(sock)[0]


def enable_read_ahead(sock: ssl.SSLSocket) -> tuple[bool, Callable[[], int] | None]:
    """:func:`read_ahead` and :func:`raw_pending` from one pass of the layout checks: what a new connection calls."""
    found = _ssl_pointer(sock)
    if found is None:
        return False, None
    ctrl, _ = _openssl()  # type: ignore[misc]  # _ssl_pointer found it
    ctrl(found[1], _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return True, _pending_call(*found)


def raw_pending(sock: ssl.SSLSocket) -> Callable[[], int] | None:
    """A call that says whether OpenSSL holds bytes of ``sock`` it has not decrypted yet (``SSL_has_pending``: with
    read-ahead, the further records one ``read`` brought in), or None where :func:`read_ahead` would refuse.

    The read loop asks it after each record: when OpenSSL holds nothing more, its last ``read`` emptied the socket,
    so the loop stops there instead of calling ``recv_into`` once more only to get ``SSLWantReadError`` (a
    ``read`` that finds nothing and an exception: 3.4 us, against 0.2 us for this call). Bytes that arrive
    meanwhile are not missed: the selector reports the socket readable again. The call keeps the ``_SSLSocket``
    alive, so the ``SSL *`` it passes is never freed under it."""
    found = _ssl_pointer(sock)
    return None if found is None else _pending_call(*found)


def _pending_call(sslobj: object, pointer: int) -> Callable[[], int] | None:
    has_pending = _has_pending()
    if has_pending is None:
        return None
    arg = ctypes.c_void_p(pointer)

    def pending(_keep: object = sslobj) -> int:
        return has_pending(arg)  # type: ignore[no-any-return]

    return pending


def _ssl_pointer(sock: ssl.SSLSocket) -> tuple[object, int] | None:
    """``sock``'s ``_SSLSocket`` and its ``SSL *``, only where every check of :func:`read_ahead` passes."""
    if (sys.implementation.name, sys.version_info[:2]) not in _VERIFIED_LAYOUTS:
        return None
    funcs = _openssl()
    sslobj = getattr(sock, "_sslobj", None)
    if funcs is None or sslobj is None or type(sslobj) is not getattr(_ssl, "_SSLSocket", None):
        return None
    pointer = ctypes.sizeof(ctypes.c_void_p)
    socket_field = object.__basicsize__  # right after PyObject_HEAD
    ssl_field = socket_field + pointer
    if type(sslobj).__basicsize__ < ssl_field + pointer:  # reading there would leave the object
        return None
    try:
        owner_ref = weakref.ref(sock)
    except TypeError:
        return None
    if ctypes.c_void_p.from_address(id(sslobj) + socket_field).value != id(owner_ref):
        return None  # not the layout we know: leave the connection as it is
    ssl_ptr = ctypes.c_void_p.from_address(id(sslobj) + ssl_field).value
    _, get_options = funcs
    if not ssl_ptr or get_options(ssl_ptr) != sock.context.options:
        return None
    return sslobj, ssl_ptr
