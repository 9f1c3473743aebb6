"""Proxy mode towards a pool over mutual TLS, certificates made by trustme.

SIPp (the legacy client) calls over UDP; pcproxy forwards over TLS to a pool
server located through NSD (``pool-tls.pcproxy.test`` -> 127.0.0.1).  Debian's
SIPp is built without TLS, so the pool server is a small asyncio TLS peer
here: it demands a client certificate (mutual TLS), records what it receives
and answers like a pool (200 with the Record-Route echoed).  pcproxy checks
the pool's certificate against the pool FQDN (RFC 5922 §4); a certificate for
another name must make the call fail with 503, never reach the pool.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from .conftest import Daemon, cli, free_port, sipp, start_daemon
from .nsd import DnsServer, start_nsd

pytestmark = pytest.mark.integration

POOL = "pool-tls.pcproxy.test"


@dataclass
class TlsPool:
    """A pool server over TLS on 127.0.0.1: answers INVITE and BYE with 200."""

    context: ssl.SSLContext
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    peer_certs: list[dict[str, object]] = field(default_factory=list)
    connections: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
            )
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert ready.wait(5)

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peer_certs.append(writer.get_extra_info("peercert") or {})
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
                body = await reader.readexactly(int(length.group(1)) if length else 0)
                message = head + body
                self.received.append(message)
                method = message.split(b" ", 1)[0]
                if method in (b"INVITE", b"BYE"):
                    writer.write(self._ok(message))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    def _ok(self, request: bytes) -> bytes:
        head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        keep = (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq", b"record-route")
        lines = [b"SIP/2.0 200 OK"]
        for line in head:
            name = line.split(b":", 1)[0].strip().lower()
            if name in keep:
                lines.append(line)
            elif name in (b"to", b"t"):
                lines.append(line if b";tag=" in line else line + b";tag=pool1")
        lines.append(b"Contact: <sip:pool@127.0.0.1:%d;transport=tls>" % self.port)
        lines.append(b"Content-Length: 0")
        return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = start_nsd(tmp_path_factory.mktemp("nsd"))
    yield server
    server.stop()


def pool_server(ca: trustme.CA, name: str) -> TlsPool:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as a Persistent Chat pool asks
    pool = TlsPool(context)
    pool.start()
    return pool


def proxy_with_tls(
    tmp_path: Path, ca: trustme.CA, nsd: DnsServer, pool: TlsPool, workers: int = 1
) -> Daemon:
    own = ca.issue_cert("pcproxy.contoso.com")
    cert, key, bundle = tmp_path / "pcproxy.pem", tmp_path / "pcproxy.key", tmp_path / "ca.pem"
    own.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as f:
        for blob in own.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(bundle))
    config = tmp_path / "pcproxy.toml"
    config.write_text(
        "[tls]\ncertificate = %r\nprivate_key = %r\nca_bundle = %r\n"
        "[proxy]\ntarget_timeout = 1.0\n" % (str(cert), str(key), str(bundle))
    )
    db = tmp_path / "pcproxy.db"
    done = cli(
        "endpoint",
        "new",
        "--sip-address",
        "sip:ocschat@contoso.com",
        "--pool-fqdn",
        POOL,
        "--pool-port",
        str(pool.port),
        "--pool-transport",
        "tls",
        db=db,
    )
    assert done.returncode == 0, done.stderr
    tls_port = free_port()
    return start_daemon(
        db,
        "127.0.0.1",
        "--config",
        str(config),
        "--listen",
        "tls:127.0.0.1:%d" % tls_port,
        "--nameserver",
        nsd.nameserver,
        workers=workers,
    )


def test_udp_client_to_a_mutual_tls_pool(tmp_path: Path, ca: trustme.CA, nsd: DnsServer) -> None:
    pool = pool_server(ca, POOL)
    daemon = proxy_with_tls(tmp_path, ca, nsd, pool)
    try:
        result = sipp("gc_call.xml", daemon, "udp", calls=2, tmp=tmp_path)
        assert result.returncode == 0, result.stdout + result.errors
    finally:
        daemon.stop()
        pool.stop()
    methods = [m.split(b" ", 1)[0] for m in pool.received]
    assert methods.count(b"INVITE") == 2 and methods.count(b"BYE") == 2
    assert methods.count(b"ACK") == 2
    assert pool.connections == 1  # one persistent connection carries both calls
    subject = str(pool.peer_certs[0].get("subjectAltName"))
    assert "pcproxy.contoso.com" in subject  # pcproxy presented its certificate
    invite = next(m for m in pool.received if m.startswith(b"INVITE"))
    assert invite.split(b"\r\n")[1].startswith(b"Via: SIP/2.0/TLS 127.0.0.1:")
    record_route = re.search(rb"\r\nRecord-Route: ([^\r]*)", invite)
    assert record_route is not None
    facing_pool, facing_client = record_route.group(1).split(b", ")
    assert b";transport=tls;lr" in facing_pool and b";transport=udp;lr" in facing_client


def test_a_pool_certificate_for_another_name_is_refused(
    tmp_path: Path, ca: trustme.CA, nsd: DnsServer
) -> None:
    pool = pool_server(ca, "impostor.pcproxy.test")
    daemon = proxy_with_tls(tmp_path, ca, nsd, pool)
    try:
        result = sipp(
            "invite_final.xml",
            daemon,
            "udp",
            tmp=tmp_path,
            expect={"status": "503", "hdr": "ms-diagnostics:", "hdr_re": "No pool server answered"},
            keys={"max_forwards": "70", "extra": "Subject: test"},
        )
        assert result.returncode == 0, result.stdout + result.errors
        daemon.wait_for("connect_failed")
    finally:
        daemon.stop()
        pool.stop()
    assert pool.received == []
