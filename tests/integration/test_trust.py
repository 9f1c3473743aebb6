"""The trust boundary with the real daemon: pcproxy is never an open relay.

A bystander (plain UDP and TCP sockets on 127.0.0.5) stands for a host an
attacker would like pcproxy to send to: every forbidden request names it in
its Request-URI, Route or Via, gets its answer from pcproxy, and the
bystander must hear nothing.  ``[security] trusted_networks`` is
127.0.0.0/29 here, so 127.0.0.9 is an untrusted source.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Daemon, free_port, sipp, start_daemon

pytestmark = pytest.mark.integration

TRUSTED = "127.0.0.0/29"
UNTRUSTED_HOST = "127.0.0.9"
BYSTANDER_HOST = "127.0.0.5"


@dataclass
class Bystander:
    """A UDP socket and a TCP listener on one address: whatever reaches them."""

    udp: socket.socket
    tcp: socket.socket
    port: int

    @property
    def hostport(self) -> str:
        return "%s:%d" % (BYSTANDER_HOST, self.port)

    def heard(self, wait: float = 1.0) -> list[bytes]:
        """What arrived within ``wait`` seconds (a TCP connection counts)."""
        got: list[bytes] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got.append(self.udp.recv(65535))
            except BlockingIOError:
                pass
            try:
                conn, _ = self.tcp.accept()
                got.append(b"tcp connection")
                conn.close()
            except BlockingIOError:
                pass
            time.sleep(0.02)
        return got


@pytest.fixture
def bystander() -> Iterator[Bystander]:
    port = free_port(BYSTANDER_HOST)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((BYSTANDER_HOST, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((BYSTANDER_HOST, port))
    tcp.listen(8)
    udp.setblocking(False)
    tcp.setblocking(False)
    yield Bystander(udp, tcp, port)
    udp.close()
    tcp.close()


def start_guarded(
    table: Path, tmp: Path, *extra: str, security: str = "", sip: str = "", more: str = ""
) -> Daemon:
    """The daemon with ``[security]`` trusting only 127.0.0.0/29 (and ``security`` lines)."""
    config = tmp / "pcproxy.toml"
    config.write_text(
        '[server]\ndrain_timeout = 0.2\n[security]\ntrusted_networks = ["%s", "::1/128"]\n'
        "%s\n[sip]\n%s\n%s\n" % (TRUSTED, security, sip, more)
    )
    return start_daemon(table, "127.0.0.1", "--config", str(config), *extra)


@pytest.fixture
def guarded(table: Path, tmp_path: Path) -> Iterator[Daemon]:
    d = start_guarded(table, tmp_path)
    yield d
    if d.proc.poll() is None:
        d.stop()


_SEQ = iter(range(1, 1 << 30))


def message(
    method: str,
    uri: str,
    *,
    source: str,
    port: int,
    transport: str = "UDP",
    to_tag: str = "",
    extra: tuple[str, ...] = (),
) -> bytes:
    n = next(_SEQ)
    lines = [
        "%s %s SIP/2.0" % (method, uri),
        "Via: SIP/2.0/%s %s:%d;branch=z9hG4bK-trust-%d-%d;rport"
        % (transport, source, port, os.getpid(), n),
        "Max-Forwards: 70",
        "From: <sip:alice@contoso.com>;tag=a%d" % n,
        "To: <%s>%s" % (uri, ";tag=" + to_tag if to_tag else ""),
        "Call-ID: trust-%d-%d@%s" % (os.getpid(), n, source),
        "CSeq: 1 %s" % method,
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


class UdpClient:
    """A UDP socket on ``host``: sends to the daemon, reads what comes back."""

    def __init__(self, host: str, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.daemon = daemon

    def request(self, method: str, uri: str, **kw: object) -> bytes:
        data = message(method, uri, source=self.host, port=self.port, **kw)  # type: ignore[arg-type]
        self.sock.sendto(data, (self.daemon.host, self.daemon.port))
        return data

    def replies(self, wait: float = 1.0) -> list[bytes]:
        got: list[bytes] = []
        self.sock.settimeout(0.05)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got.append(self.sock.recv(65535))
            except TimeoutError:
                pass
        return got

    def final(self, timeout: float = 5.0) -> bytes:
        """The first response above 1xx."""
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65535)
            if not data.startswith(b"SIP/2.0 1"):
                return data

    def close(self) -> None:
        self.sock.close()


class TcpClient:
    def __init__(self, host: str, daemon: Daemon) -> None:
        self.sock = socket.create_connection(
            (daemon.host, daemon.port), timeout=5, source_address=(host, 0)
        )
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.buffer = b""

    def request(self, method: str, uri: str, **kw: object) -> bytes:
        data = message(method, uri, source=self.host, port=self.port, transport="TCP", **kw)  # type: ignore[arg-type]
        self.sock.sendall(data)
        return data

    def responses(self, wait: float) -> list[bytes]:
        """Every complete response read within ``wait`` seconds (none has a body)."""
        deadline = time.monotonic() + wait
        self.sock.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65535)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.buffer += chunk
        parts = self.buffer.split(b"\r\n\r\n")
        self.buffer = parts.pop()
        return [p + b"\r\n\r\n" for p in parts]

    def final(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for resp in self.responses(0.1):
                if not resp.startswith(b"SIP/2.0 1"):
                    return resp
        raise AssertionError("no final response")

    def close(self) -> None:
        self.sock.close()


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def header(data: bytes, name: str) -> str:
    m = re.search(rb"(?im)^%s\s*:\s*(.*?)\r$" % name.encode(), data)
    assert m is not None, data
    return m.group(1).decode()


# --- (a) out-of-dialog: only table URIs go anywhere ----------
@pytest.mark.parametrize("via_route", [False, True])
def test_request_for_a_non_table_uri_is_404_and_goes_nowhere(
    guarded: Daemon, bystander: Bystander, via_route: bool
) -> None:
    client = UdpClient("127.0.0.1", guarded)
    if via_route:  # a preloaded Route to the bystander, Request-URI not in the table
        client.request(
            "INVITE", "sip:nobody@contoso.com", extra=("Route: <sip:%s;lr>" % bystander.hostport,)
        )
    else:  # the Request-URI names the bystander itself
        client.request("INVITE", "sip:victim@%s" % bystander.hostport)
    answer = client.final()
    assert status(answer) == 404
    assert header(answer, "ms-diagnostics").startswith("52001;")
    assert bystander.heard() == []
    client.close()


# --- (b) in-dialog: only with pcproxy's own Record-Route token ---------------------------
@pytest.mark.parametrize("user", ["o.0123456789abcdef0123", "iAAAA.0123456789abcdef0123", ""])
def test_in_dialog_request_with_forged_or_absent_token_is_403(
    guarded: Daemon, bystander: Bystander, user: str
) -> None:
    client = UdpClient("127.0.0.1", guarded)
    own = "%s127.0.0.1:%d" % (user + "@" if user else "", guarded.port)
    client.request(
        "BYE",
        "sip:victim@%s" % bystander.hostport,
        to_tag="b1",
        extra=("Route: <sip:%s;lr>, <sip:%s;lr>" % (own, bystander.hostport),),
    )
    answer = client.final()
    assert status(answer) == 403
    assert header(answer, "ms-diagnostics").startswith("52006;")
    assert bystander.heard() == []
    client.close()


# --- (c) responses: only to pcproxy's own client transactions ----------------------------
def test_stray_response_is_dropped(guarded: Daemon, bystander: Bystander) -> None:
    client = UdpClient("127.0.0.1", guarded)
    stray = (
        "SIP/2.0 200 OK\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-not-ours\r\n"
        "Via: SIP/2.0/UDP %s;branch=z9hG4bK-victim\r\n"
        "From: <sip:a@contoso.com>;tag=1\r\nTo: <sip:b@contoso.com>;tag=2\r\n"
        "Call-ID: stray@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ) % (guarded.port, bystander.hostport)
    client.sock.sendto(stray.encode(), (guarded.host, guarded.port))
    assert client.replies() == []
    assert bystander.heard(0.2) == []
    client.close()


# --- trusted networks ----------
def test_untrusted_source_gets_403_over_udp_and_nothing_is_forwarded(
    guarded: Daemon, bystander: Bystander
) -> None:
    client = UdpClient(UNTRUSTED_HOST, guarded)
    for uri in ("sip:ocschat@contoso.com", "sip:victim@%s" % bystander.hostport):
        client.request("INVITE", uri)
        answer = client.final()
        assert status(answer) == 403
        diag = header(answer, "ms-diagnostics")
        assert diag.startswith("52007;") and UNTRUSTED_HOST in diag
    # an ACK and a response from there get nothing at all
    client.request("ACK", "sip:ocschat@contoso.com")
    client.sock.sendto(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP %s;branch=z9hG4bK-x\r\nFrom: <sip:a@b.c>;tag=1\r\n"
        b"To: <sip:a@b.c>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        % bystander.hostport.encode(),
        (guarded.host, guarded.port),
    )
    assert client.replies() == []
    assert bystander.heard(0.2) == []
    # a trusted source on the same daemon is served
    trusted = UdpClient("127.0.0.1", guarded)
    trusted.request("OPTIONS", "sip:127.0.0.1:%d" % guarded.port)
    assert status(trusted.final()) == 200
    client.close()
    trusted.close()


def test_untrusted_source_gets_403_over_tcp(guarded: Daemon, bystander: Bystander) -> None:
    client = TcpClient(UNTRUSTED_HOST, guarded)
    client.request("OPTIONS", "sip:victim@%s" % bystander.hostport)
    answer = client.final()
    assert status(answer) == 403
    assert header(answer, "ms-diagnostics").startswith("52007;")
    assert bystander.heard() == []
    client.close()


# --- rate limits ----------
def test_udp_flood_from_one_source_leaves_another_source_served(
    table: Path, tmp_path: Path
) -> None:
    daemon = start_guarded(
        table, tmp_path, "--mode", "redirect", security="rate = 50.0\nburst = 100"
    )
    sent = [0]
    answered: list[bytes] = []
    stop = threading.Event()
    flooder = UdpClient("127.0.0.7", daemon)

    def flood() -> None:  # bounded: 20 000 datagrams, 20 s
        deadline = time.monotonic() + 20
        while not stop.is_set() and sent[0] < 20_000 and time.monotonic() < deadline:
            flooder.request("INVITE", "sip:ocschat@contoso.com")
            sent[0] += 1
            if sent[0] % 20 == 0:
                time.sleep(0.005)

    def drain() -> None:
        flooder.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                answered.append(flooder.sock.recv(65535))
            except (TimeoutError, OSError):
                pass

    threads = [threading.Thread(target=flood), threading.Thread(target=drain)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert sent[0] > 150, "the flood did not start"
        result = sipp("redirect.xml", daemon, "udp", calls=40, tmp=tmp_path)
        flooded = sent[0]
    finally:
        stop.set()
        for t in threads:
            t.join(25)
        flooder.close()
        daemon.stop()
    assert result.returncode == 0, result.errors
    finals = [d for d in answered if d.startswith(b"SIP/2.0 302")]
    assert finals, "the flooding source was not served at all"
    assert len({header(d, "call-id") for d in finals}) < flooded // 2


def test_tcp_over_the_rate_gets_few_503_with_retry_after(table: Path, tmp_path: Path) -> None:
    daemon = start_guarded(table, tmp_path, security="rate = 5.0\nburst = 5")
    client = TcpClient("127.0.0.1", daemon)
    try:
        for _ in range(60):
            client.request("OPTIONS", "sip:127.0.0.1:%d" % daemon.port)
        answers = client.responses(1.5)
    finally:
        client.close()
        daemon.stop()
    codes = [status(a) for a in answers]
    assert codes.count(200) >= 5
    busy = [a for a in answers if status(a) == 503]
    assert busy, codes
    assert len(busy) < 60 - codes.count(200)  # not every refused request is answered
    assert all(int(header(a, "retry-after")) >= 1 for a in busy)
    assert all(header(a, "ms-diagnostics").startswith("52008;") for a in busy)


# --- connection bounds ----------
def test_connections_per_source_are_bounded(table: Path, tmp_path: Path) -> None:
    daemon = start_guarded(table, tmp_path, security="max_connections_per_source = 3")
    socks: list[TcpClient] = []
    try:
        socks = [TcpClient("127.0.0.6", daemon) for _ in range(5)]
        served = []
        for client in socks:
            try:
                client.request("OPTIONS", "sip:127.0.0.1:%d" % daemon.port)
                served.append(any(status(r) == 200 for r in client.responses(0.5)))
            except OSError:  # reset by the daemon
                served.append(False)
        assert served == [True, True, True, False, False]
        other = TcpClient("127.0.0.4", daemon)  # another source has a share of its own
        other.request("OPTIONS", "sip:127.0.0.1:%d" % daemon.port)
        assert status(other.final()) == 200
        other.close()
        socks[0].close()  # a freed slot is reusable
        time.sleep(0.2)
        again = TcpClient("127.0.0.6", daemon)
        socks.append(again)
        again.request("OPTIONS", "sip:127.0.0.1:%d" % daemon.port)
        assert status(again.final()) == 200
    finally:
        for client in socks:
            client.close()
        daemon.stop()


def test_idle_accepted_connection_is_closed(table: Path, tmp_path: Path) -> None:
    daemon = start_guarded(table, tmp_path, sip="tcp_idle_timeout = 1.0")
    client = TcpClient("127.0.0.1", daemon)
    try:
        client.request("OPTIONS", "sip:127.0.0.1:%d" % daemon.port)
        assert status(client.final()) == 200
        client.sock.settimeout(10)  # closed by the sweeper, within a bound
        data = b""
        while True:
            chunk = client.sock.recv(65535)
            if not chunk:
                break
            data += chunk
        assert data == b""
    finally:
        client.close()
        daemon.stop()


# --- mutual TLS: the certificate names ----------
def test_tls_peer_whose_certificate_names_no_allowed_peer_gets_403(
    table: Path, tmp_path: Path
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    own = ca.issue_cert("pcproxy.contoso.com")
    cert, key, bundle = tmp_path / "pcproxy.pem", tmp_path / "pcproxy.key", tmp_path / "ca.pem"
    own.cert_chain_pems[0].write_to_path(str(cert))
    own.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    port = free_port()
    daemon = start_guarded(
        table,
        tmp_path,
        "--listen",
        "tls:127.0.0.1:%d" % port,
        more='[tls]\ncertificate = "%s"\nprivate_key = "%s"\nca_bundle = "%s"\n'
        'require_client_certificate = true\nallowed_peers = ["fe1.contoso.com"]\n'
        % (cert, key, bundle),
    )

    def ask(name: str) -> bytes:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        ca.issue_cert(name).configure_cert(context)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with context.wrap_socket(raw, server_hostname="pcproxy.contoso.com") as tls:
            tls.sendall(
                message(
                    "OPTIONS",
                    "sip:127.0.0.1:%d" % port,
                    source="127.0.0.1",
                    port=tls.getsockname()[1],
                    transport="TLS",
                )
            )
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65535)
                assert chunk, "connection closed"
                data += chunk
            return data

    try:
        assert status(ask("fe1.contoso.com")) == 200
        refused = ask("fe2.contoso.com")
        assert status(refused) == 403
        assert header(refused, "ms-diagnostics").startswith("52007;")
    finally:
        daemon.stop()
