"""Reading one pyOpenSSL DTLS connection, for the server's parts: what it has to send (its write BIO, drained), and
the peer and the failure as the log lines name them."""

from __future__ import annotations

from OpenSSL import SSL

from ._dtls_session import Session

_BIO_CHUNK = 65536


def _drain(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(conn.bio_read(_BIO_CHUNK))
        except SSL.WantReadError:
            break
    return b"".join(chunks)


def _peer(session: Session) -> str:
    return f"{session.peer[0]}:{session.peer[1]}"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text.upper() or "did not return a certificate" in text:
        return "no client certificate presented"
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return f"DTLS error: {args[0][-1]}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
