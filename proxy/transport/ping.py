"""``pcproxy ping``: one OPTIONS request to a running pcproxy (RFC 3261 §11).

A blocking client for operators and the container HEALTHCHECK: it sends
OPTIONS addressed to the server itself over UDP, TCP or TLS and reports the
status line and round-trip time of the final response.  ``pcproxy explain``
probes pool servers with it too.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass

from proxy.config import split_host_port
from proxy.sip.errors import SipError
from proxy.sip.framing import MessageFramed, StreamFramer
from proxy.sip.message import Response, parse


@dataclass(frozen=True)
class PingResult:
    status: int
    reason: str
    rtt_ms: float


def split_hostport(target: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; raises ValueError naming what is wrong."""
    host, port = split_host_port(target)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, got %r" % target)
    return host, int(port)


def ping(
    host: str,
    port: int,
    transport: str = "udp",
    timeout: float = 2.0,
    *,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> PingResult:
    """Send OPTIONS and wait for its final response (RFC 3261 §11.1).

    Over TLS the connection is made with ``context`` (default: the system's
    CAs, the name checked) and ``server_hostname`` (default: ``host``), RFC
    5922 §7.3.  Raises OSError (``ssl.SSLError`` among them) or TimeoutError.
    """
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    )
    family, kind, _, _, addr = infos[0]
    with socket.socket(family, kind) as raw:
        raw.settimeout(timeout)
        raw.connect(addr)
        if transport != "tls":
            return _exchange(raw, host, port, transport, timeout)
        context = context if context is not None else ssl.create_default_context()
        with context.wrap_socket(raw, server_hostname=server_hostname or host) as tls:
            return _exchange(tls, host, port, transport, timeout)


def _exchange(
    sock: socket.socket, host: str, port: int, transport: str, timeout: float
) -> PingResult:
    """OPTIONS out on a connected socket, its final response back."""
    local = sock.getsockname()
    lhost = "[%s]" % local[0] if ":" in local[0] else local[0]
    rhost = "[%s]" % host if ":" in host else host
    branch = "z9hG4bK-ping-" + os.urandom(6).hex()
    request = (
        "OPTIONS sip:%s:%d SIP/2.0\r\n"
        "Via: SIP/2.0/%s %s:%d;branch=%s;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:ping@%s>;tag=%s\r\n"
        "To: <sip:%s:%d>\r\n"
        "Call-ID: %s@%s\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
        % (
            rhost,
            port,
            transport.upper(),
            lhost,
            local[1],
            branch,
            lhost,
            os.urandom(4).hex(),
            rhost,
            port,
            os.urandom(8).hex(),
            lhost,
        )
    ).encode()
    started = time.monotonic()
    sock.sendall(request) if transport != "udp" else sock.send(request)
    framer = StreamFramer()
    deadline = started + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(65535)
        if not data:
            raise OSError("connection closed before a response")
        chunks = (
            [data]
            if transport == "udp"
            else [ev.data for ev in framer.feed(data) if isinstance(ev, MessageFramed)]
        )
        for chunk in chunks:
            try:
                msg = parse(chunk, stream=transport != "udp")
            except SipError:
                continue
            if (
                isinstance(msg, Response)
                and msg.status >= 200
                and branch in chunk.decode("latin-1")
            ):
                return PingResult(msg.status, msg.reason, (time.monotonic() - started) * 1000.0)
