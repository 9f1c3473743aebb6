"""The daemon in redirect mode, driven by SIPp as the legacy client."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import PCPROXY, Daemon, cli, free_port, sipp, start_daemon

pytestmark = pytest.mark.integration
TRANSPORTS = ["udp", "tcp"]


def final(
    daemon: Daemon,
    tmp: Path,
    status: int,
    hdr: str,
    hdr_re: str,
    *,
    transport: str = "udp",
    method: str = "INVITE",
    service: str = "ocschat",
    max_forwards: int = 70,
    extra: str = "Subject: test",
) -> None:
    """Send one request with SIPp and check its final response and one header."""
    scenario = "invite_final.xml" if method == "INVITE" else "request_final.xml"
    result = sipp(
        scenario,
        daemon,
        transport,
        service=service,
        tmp=tmp,
        method=None if method == "INVITE" else method,
        expect={"status": str(status), "hdr": hdr, "hdr_re": hdr_re},
        keys={"max_forwards": str(max_forwards), "extra": extra},
    )
    assert result.returncode == 0, result.errors


def redirected(
    daemon: Daemon, tmp: Path, contact_re: str, *, transport: str = "udp", **kw: Any
) -> None:
    """The client's INVITE through SIPp; the 302's Contact must match ``contact_re``."""
    result = sipp("redirect.xml", daemon, transport, tmp=tmp, expect={"contact": contact_re}, **kw)
    assert result.returncode == 0, result.errors


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_invite_to_table_uri_is_redirected_to_the_pool(
    daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    redirected(
        daemon, tmp_path, r"^ *<sip:ocschat@pcpool\.contoso\.com> *$", transport=transport, calls=20
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_contact_carries_the_endpoint_port_and_transport(
    daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    # the table holds sip:GroupChat@Fabrikam.com; the client writes it in another case
    redirected(
        daemon,
        tmp_path,
        r"^ *<sip:groupchat@pcpool\.fabrikam\.com:5041;transport=tls> *$",
        transport=transport,
        service="groupchat",
        domain="FABRIKAM.com",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_subscribe_to_table_uri_is_redirected(
    daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    final(
        daemon,
        tmp_path,
        302,
        "Contact:",
        r"<sip:ocschat@pcpool\.contoso\.com>",
        transport=transport,
        method="SUBSCRIBE",
        extra="Event: presence",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_uri_gets_404_with_ms_diagnostics(
    daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    final(
        daemon,
        tmp_path,
        404,
        "ms-diagnostics:",
        r'reason="No persistent chat endpoint for nobody@contoso\.com"',
        transport=transport,
        service="nobody",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_required_extension_gets_420_with_unsupported(
    daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    final(
        daemon,
        tmp_path,
        420,
        "Unsupported:",
        "^ *x-no-such-ext *$",
        transport=transport,
        extra="Require: x-no-such-ext",
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_max_forwards_zero_gets_483(daemon: Daemon, transport: str, tmp_path: Path) -> None:
    final(daemon, tmp_path, 483, "Call-ID:", ".", transport=transport, max_forwards=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_options_to_pcproxy_itself_gets_200(daemon: Daemon, transport: str, tmp_path: Path) -> None:
    result = sipp("options.xml", daemon, transport, tmp=tmp_path)
    assert result.returncode == 0, result.errors


def test_register_is_refused_with_405(daemon: Daemon, tmp_path: Path) -> None:
    final(daemon, tmp_path, 405, "Allow:", "INVITE", method="REGISTER", extra="Expires: 3600")


def test_ipv6_listener_redirects(table: Path, tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    d = start_daemon(table, "::1", "--mode", "redirect")
    try:
        for transport in TRANSPORTS:
            redirected(d, tmp_path, r"<sip:ocschat@pcpool\.contoso\.com>", transport=transport)
    finally:
        assert d.stop() == 0


def test_cli_change_is_served_within_one_second(
    daemon: Daemon, table: Path, tmp_path: Path
) -> None:
    final(daemon, tmp_path, 404, "Call-ID:", ".", service="pchat")

    mark = daemon.mark()
    started = time.monotonic()
    done = cli(
        "endpoint",
        "new",
        "--sip-address",
        "sip:pchat@contoso.com",
        "--pool-fqdn",
        "pcpool2.contoso.com",
        db=table,
    )
    assert done.returncode == 0, done.stderr
    daemon.wait_for("table_loaded", timeout=1.0, since=mark, endpoints=3)
    assert time.monotonic() - started < 1.0

    redirected(daemon, tmp_path, r"<sip:pchat@pcpool2\.contoso\.com>", service="pchat")

    done = cli(
        "endpoint", "set", "sip:pchat@contoso.com", "--pool-fqdn", "pcpool3.contoso.com", db=table
    )
    assert done.returncode == 0, done.stderr
    daemon.wait_for("table_loaded", timeout=1.0, since=mark + 1, endpoints=3)
    redirected(daemon, tmp_path, r"<sip:pchat@pcpool3\.contoso\.com>", service="pchat")


def test_sighup_reloads_the_table(daemon: Daemon) -> None:
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("table_loaded", since=mark, why="sighup")


def test_a_table_that_fails_to_load_leaves_the_old_snapshot_serving(
    daemon: Daemon, table: Path, tmp_path: Path
) -> None:
    mark = daemon.mark()
    with sqlite3.connect(table) as db:  # a hand edit that no CLI command would make
        db.execute(
            "UPDATE endpoint SET pool_fqdn = 'not a name' WHERE key = 'groupchat@fabrikam.com'"
        )
    daemon.wait_for("table_load_failed", since=mark)
    redirected(daemon, tmp_path, r"<sip:ocschat@pcpool\.contoso\.com>")


def test_garbage_datagrams_do_not_hurt_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for junk in (
            b"\x00\xff" * 100,
            b"INVITE\r\n\r\n",
            b"SIP/2.0 200 OK\r\n\r\n",
            b"INVITE sip:a@b SIP/2.0\r\nVia: broken\r\n\r\n",
            b"\r\n\r\n",
        ):
            s.sendto(junk, ("127.0.0.1", daemon.port))
        with pytest.raises(TimeoutError):
            s.recvfrom(65535)  # none of these can be answered
    result = sipp("options.xml", daemon, tmp=tmp_path)
    assert result.returncode == 0, result.errors


def test_malformed_request_with_a_via_gets_400(daemon: Daemon) -> None:
    request = (
        "INVITE sip:ocschat@contoso.com SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-bad-cseq;rport\r\n"
        "From: <sip:a@contoso.com>;tag=1\r\nTo: <sip:ocschat@contoso.com>\r\n"
        "Call-ID: bad-cseq\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        port = s.getsockname()[1]
        s.sendto(request.encode(), ("127.0.0.1", daemon.port))
        data, _ = s.recvfrom(65535)
    assert data.startswith(b"SIP/2.0 400 ")
    # RFC 3581: sent to the source port, with rport filled in and received added
    assert b"rport=%d;received=127.0.0.1" % port in data


def test_tcp_keepalive_ping_gets_pong(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(b"\r\n\r\n")
        assert s.recv(16) == b"\r\n"  # RFC 5626 §4.4.1


def test_sigterm_drains_and_exits_zero(daemon: Daemon, tmp_path: Path) -> None:
    redirected(daemon, tmp_path, r"<sip:ocschat@pcpool\.contoso\.com>", calls=5)
    assert daemon.stop(signal.SIGTERM) == 0
    assert any(ev.get("event") == "stopped" for ev in daemon.events)


def test_cli_errors_name_the_field(table: Path) -> None:
    done = cli(
        "endpoint",
        "new",
        "--sip-address",
        "ocschat@contoso.com",
        "--pool-fqdn",
        "pcpool.contoso.com",
        db=table,
    )
    assert done.returncode != 0
    assert "--sip-address" in done.stderr and "ocschat@contoso.com" in done.stderr
    done = cli(
        "endpoint",
        "new",
        "--sip-address",
        "sip:OCSChat@Contoso.com",
        "--pool-fqdn",
        "pcpool.contoso.com",
        db=table,
    )
    assert done.returncode != 0 and "already exists" in done.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ping_reports_200_from_a_running_daemon(daemon: Daemon, transport: str) -> None:
    done = subprocess.run(
        [*PCPROXY, "ping", "127.0.0.1:%d" % daemon.port, "--transport", transport],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "200 OK" in done.stdout


def test_ping_without_a_daemon_fails_with_one_line() -> None:
    port = free_port()
    done = subprocess.run(
        [*PCPROXY, "ping", "127.0.0.1:%d" % port, "--transport", "tcp"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "pcproxy: error:" in done.stderr
