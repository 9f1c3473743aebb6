"""A one-shot SIP peer over TLS for tests: answers the first request it reads."""

from __future__ import annotations

import re
import socket
import ssl
import threading


def final_response(request: bytes, status: str = "200 OK") -> bytes:
    """A final response to ``request`` (RFC 3261 §8.2.6: Via, From, To, Call-ID, CSeq)."""
    headers = [
        line
        for line in request.decode().split("\r\n")[1:]
        if re.match(r"(Via|From|To|Call-ID|CSeq):", line)
    ]
    return (
        "SIP/2.0 %s\r\n%s\r\nContent-Length: 0\r\n\r\n" % (status, "\r\n".join(headers))
    ).encode()


def answer_once_over_tls(
    context: ssl.SSLContext, timeout: float = 5.0
) -> tuple[socket.socket, threading.Thread]:
    """A TLS server on 127.0.0.1 (``context``: its certificate, and whether it
    demands one) that answers the first request of the first connection with
    200 when the handshake succeeds; returns the listening socket and the
    serving thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(4096)
                tls.sendall(final_response(data))
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread
