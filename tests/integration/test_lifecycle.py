"""The daemon's life as an operator sees it: TLS listeners, SIGHUP, SIGTERM, systemd.

The real daemon runs from a config file (no --log-level, so the file's level
is the one in force) on ports chosen at run time.  TLS clients are Python's
``ssl`` with certificates from trustme.  systemd is stood in for by an
AF_UNIX datagram socket passed as ``$NOTIFY_SOCKET``, which is all systemd
offers a ``Type=notify`` service.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.unit.sipmsg import request

from .conftest import PCPROXY, Daemon, _read_log, free_port

pytestmark = pytest.mark.integration

NAME = "pcproxy.contoso.com"
FE = "fe1.contoso.com"


@dataclass
class Pki:
    ca: trustme.CA
    directory: Path

    @property
    def bundle(self) -> Path:
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path

    def issue(self, name: str, stem: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(name)
        pem, key = self.directory / ("%s.pem" % stem), self.directory / ("%s.key" % stem)
        write_identity(cert, pem, key)
        return pem, key

    def client(self, name: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.bundle))
        if name is not None:
            self.ca.issue_cert(name).configure_cert(context)
        return context


def write_identity(cert: trustme.LeafCert, pem: Path, key: Path) -> None:
    with pem.open("wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(trustme.CA(), tmp_path)


def start(
    tmp_path: Path,
    config: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    workers: int = 1,
) -> Daemon:
    """``pcproxy serve --config FILE --db DB --workers N``: everything else
    from the file; one process unless ``workers`` says otherwise."""
    path = tmp_path / "pcproxy.toml"
    path.write_text(config)
    db = tmp_path / "pcproxy.db"
    proc = subprocess.Popen(
        [*PCPROXY, "serve", "--config", str(path), "--db", str(db), "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    daemon = Daemon(proc, port or 0, "127.0.0.1", db)
    threading.Thread(target=_read_log, args=(daemon,), daemon=True).start()
    try:
        daemon.wait_for("ready", timeout=15)
    except AssertionError:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


Started = list[Daemon]


@pytest.fixture
def stopper() -> Iterator[Started]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


def tls_config(pki: Pki, port: int, *, mutual: bool = False, allowed: tuple[str, ...] = ()) -> str:
    cert, key = pki.directory / "pcproxy.pem", pki.directory / "pcproxy.key"
    if not cert.exists():
        write_identity(pki.ca.issue_cert(NAME), cert, key)
    text = (
        '[server]\nlisten = ["udp:127.0.0.1:%d", "tls:127.0.0.1:%d"]\n'
        "[tls]\ncertificate = %r\nprivate_key = %r\nca_bundle = %r\n"
        % (port, port, str(cert), str(key), str(pki.bundle))
    )
    if mutual:
        text += "require_client_certificate = true\nallowed_peers = %s\n" % (
            "[%s]" % ", ".join('"%s"' % name for name in allowed)
        )
    return text


class TlsClient:
    """One TLS connection to the listener that sends OPTIONS (RFC 3261 §11)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = context.wrap_socket(raw, server_hostname=NAME)
        self.port = port
        self.sent = 0

    def certificate(self) -> bytes:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der

    def options(self) -> str:
        """Send OPTIONS to pcproxy itself; the status line of its answer."""
        self.sent += 1
        local = self.sock.getsockname()
        self.sock.sendall(
            request(
                "OPTIONS",
                "sip:127.0.0.1:%d;transport=tls" % self.port,
                via="SIP/2.0/TLS %s:%d;branch=z9hG4bK-tls-%d" % (local[0], local[1], self.sent),
                to="<sip:127.0.0.1:%d>" % self.port,
                call_id="tls-%d-%d@fe1.contoso.com" % (local[1], self.sent),
            )
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed by pcproxy")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
        want = int(length.group(1)) if length else 0
        while len(body) < want:
            body += self.sock.recv(4096)
        return head.split(b"\r\n", 1)[0].decode()

    def close(self) -> None:
        self.sock.close()


def logged(daemon: Daemon, event: str, since: int) -> dict[str, object]:
    """An event of a daemon that has exited: its last lines may still be in the pipe."""
    for _ in range(250):
        with daemon.lock:
            found = [e for e in daemon.events[since:] if e.get("event") == event]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("no %r event; log: %s" % (event, daemon.events[since:]))


def reloaded(daemon: Daemon, since: int) -> dict[str, Any]:
    return daemon.wait_for("reloaded", since=since, timeout=10)


def der(path: Path) -> bytes:
    text = path.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


# --- TLS listeners ----------------------------------------------------------------------


def test_options_over_a_tls_listener_gets_200(tmp_path: Path, pki: Pki, stopper: Started) -> None:
    port = free_port()
    daemon = start(tmp_path, tls_config(pki, port), port=port)
    stopper.append(daemon)
    client = TlsClient(port, pki.client())
    try:
        assert client.options() == "SIP/2.0 200 OK"
        assert client.certificate() == der(pki.directory / "pcproxy.pem")
    finally:
        client.close()
    assert daemon.stop() == 0


def test_mutual_tls_refuses_a_client_without_certificate_and_counts_it(
    tmp_path: Path, pki: Pki, stopper: Started
) -> None:
    port = free_port()
    daemon = start(tmp_path, tls_config(pki, port, mutual=True, allowed=(FE,)), port=port)
    stopper.append(daemon)
    # TLS 1.3: the client finishes first; the refusal shows when it reads
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TlsClient(port, pki.client()).options()
    failed = daemon.wait_for("tls_handshake_failed")
    assert failed["reason"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE" and failed["failures"] == 1
    # a verified certificate outside allowed_peers: the handshake succeeds and
    # every request gets 403 (proxy.admission; ms-diagnostics 52007)
    stranger = TlsClient(port, pki.client("fe9.contoso.com"))
    try:
        assert stranger.options() == "SIP/2.0 403 Forbidden"
    finally:
        stranger.close()
    allowed = TlsClient(port, pki.client(FE))
    try:
        assert allowed.options() == "SIP/2.0 200 OK"
    finally:
        allowed.close()
    assert not [e for e in daemon.events if "Traceback" in str(e)]
    assert daemon.stop() == 0


def test_sighup_reloads_the_certificate_and_keeps_established_connections(
    tmp_path: Path, pki: Pki, stopper: Started
) -> None:
    port = free_port()
    daemon = start(tmp_path, tls_config(pki, port), port=port)
    stopper.append(daemon)
    cert, key = pki.directory / "pcproxy.pem", pki.directory / "pcproxy.key"
    old = der(cert)
    established = TlsClient(port, pki.client())
    try:
        assert established.options() == "SIP/2.0 200 OK"
        write_identity(pki.ca.issue_cert(NAME), cert, key)  # renewed on disk
        new = der(cert)
        assert new != old
        mark = daemon.hup()
        report = reloaded(daemon, mark)
        assert "tls" in report["applied"] and report["failed"] == {}
        assert report["restart_required"] == []

        assert established.options() == "SIP/2.0 200 OK"  # still up, on its old session
        assert established.certificate() == old
        fresh = TlsClient(port, pki.client())
        try:
            assert fresh.certificate() == new
            assert fresh.options() == "SIP/2.0 200 OK"
        finally:
            fresh.close()
    finally:
        established.close()
    assert daemon.stop() == 0


def test_a_bad_new_certificate_keeps_the_old_one_and_says_why(
    tmp_path: Path, pki: Pki, stopper: Started
) -> None:
    port = free_port()
    daemon = start(tmp_path, tls_config(pki, port), port=port)
    stopper.append(daemon)
    cert = pki.directory / "pcproxy.pem"
    old = der(cert)
    cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated by a failed renewal\n")
    mark = daemon.hup()
    report = reloaded(daemon, mark)
    assert report["level"] == "warning"
    failed = report["failed"]
    assert isinstance(failed, dict) and failed["tls"].startswith("tls.certificate: %s: " % cert)
    assert "tls" not in report["applied"] and "log" in report["applied"]
    client = TlsClient(port, pki.client())
    try:
        assert client.certificate() == old
        assert client.options() == "SIP/2.0 200 OK"
    finally:
        client.close()
    assert daemon.stop() == 0


# --- SIGHUP -----------------------------------------------------------------------------


def test_sighup_applies_the_log_level_and_names_what_needs_a_restart(
    tmp_path: Path, stopper: Started
) -> None:
    port = free_port()
    config = '[server]\nlisten = ["udp:127.0.0.1:%d"]\n[log]\nlevel = "info"\n' % port
    daemon = start(tmp_path, config, port=port)
    stopper.append(daemon)
    path = tmp_path / "pcproxy.toml"
    path.write_text(
        '[server]\nlisten = ["udp:127.0.0.1:%d", "tcp:127.0.0.1:%d"]\n'
        'mode = "redirect"\n[log]\nlevel = "warning"\n' % (port, port)
    )
    mark = daemon.hup()
    report = reloaded(daemon, mark)
    assert report["level"] == "warning"
    assert report["changed"] == ["server.listen", "server.mode", "log.level"]
    assert report["restart_required"] == ["server.listen", "server.mode"]
    assert report["applied"] == ["log", "tls", "table", "security", "drain_timeout"]
    with pytest.raises(ConnectionRefusedError):  # the new listener waits for a restart
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    # at warning level the info line of the next SIGHUP is gone, the warning stays
    mark = daemon.hup()
    report = reloaded(daemon, mark)
    assert report["restart_required"] == ["server.listen", "server.mode"]
    assert [e["event"] for e in daemon.events[mark:]] == ["reloaded"]
    assert daemon.stop() == 0


def test_an_invalid_file_on_sighup_keeps_everything_and_names_the_field(
    tmp_path: Path, stopper: Started
) -> None:
    port = free_port()
    config = '[server]\nlisten = ["udp:127.0.0.1:%d"]\n' % port
    daemon = start(tmp_path, config, port=port)
    stopper.append(daemon)
    (tmp_path / "pcproxy.toml").write_text(config + "drain_timeout = -1\n")
    mark = daemon.hup()
    failed = daemon.wait_for("reload_failed", since=mark)
    assert "server.drain_timeout" in str(failed["error"])
    done = subprocess.run(
        [*PCPROXY, "ping", "127.0.0.1:%d" % port], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert daemon.stop() == 0


# --- systemd ----------------------------------------------------------------------------


class NotifySocket:
    """systemd's side of sd_notify: an abstract AF_UNIX datagram socket."""

    def __init__(self) -> None:
        self.name = "pcproxy-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())
        self.sock.settimeout(15)

    def start(self, tmp_path: Path, workers: int = 1) -> Daemon:
        """The daemon on a free UDP port, told to notify this socket."""
        port = free_port()
        config = '[server]\nlisten = ["udp:127.0.0.1:%d"]\n' % port
        env = {"NOTIFY_SOCKET": "@" + self.name}
        return start(tmp_path, config, env=env, port=port, workers=workers)

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.sock.close()


def test_sd_notify_messages_arrive_in_order(
    tmp_path: Path, stopper: Started, notify: NotifySocket
) -> None:
    daemon = notify.start(tmp_path)
    stopper.append(daemon)
    ready = notify.receive()
    assert ready["READY"] == "1"
    assert ready["STATUS"] == "serving 0 endpoints on udp:127.0.0.1:%d" % daemon.port
    daemon.hup()
    reloading = notify.receive()
    assert reloading["RELOADING"] == "1"
    assert (
        0 < int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    )
    assert notify.receive()["READY"] == "1"
    daemon.stop(signal.SIGTERM)
    stopping = notify.receive()
    assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("draining")
    assert daemon.proc.returncode == 0


def test_with_workers_the_supervisor_alone_speaks_to_systemd(
    tmp_path: Path, stopper: Started, notify: NotifySocket
) -> None:
    """systemd hears from its main process: READY=1 once every worker is
    ready, RELOADING=1 then READY=1 for SIGHUP, STOPPING=1 for SIGTERM;
    nothing from the workers themselves."""
    daemon = notify.start(tmp_path, workers=2)
    stopper.append(daemon)
    assert notify.receive() == {"READY": "1", "STATUS": "serving with 2 workers"}
    daemon.hup()
    assert notify.receive()["RELOADING"] == "1"
    assert notify.receive()["READY"] == "1"
    daemon.stop(signal.SIGTERM)
    assert notify.receive()["STOPPING"] == "1"
    notify.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        notify.sock.recv(4096)  # no worker spoke
    assert daemon.proc.returncode == 0


# --- SIGTERM ----------------------------------------------------------------------------


def test_a_second_sigterm_exits_at_once_while_a_transaction_is_in_flight(
    tmp_path: Path, table: Path, stopper: Started
) -> None:
    port = free_port()
    config = (
        '[server]\nlisten = ["udp:127.0.0.1:%d"]\nmode = "redirect"\ndrain_timeout = 120.0\n' % port
    )
    daemon = start(tmp_path, config, port=port)
    stopper.append(daemon)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        local = client.getsockname()
        invite = request(via="SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-drain;rport" % local[1])
        client.sendto(invite, ("127.0.0.1", port))
        status = b""
        while not status.startswith(b"SIP/2.0 3"):
            status = client.recv(65535).split(b"\r\n", 1)[0]
        # no ACK: the INVITE server transaction stays in Completed (RFC 3261 §17.2.1)
        mark = daemon.mark()
        os.kill(daemon.proc.pid, signal.SIGTERM)
        daemon.wait_for("draining", since=mark)
        time.sleep(1.0)
        assert daemon.proc.poll() is None  # still waiting for the ACK
        os.kill(daemon.proc.pid, signal.SIGTERM)
        assert daemon.proc.wait(30) == 0  # far less than drain_timeout
    stopped = logged(daemon, "stopped", mark)
    assert stopped["in_flight"] == 1
    assert [e["count"] for e in daemon.events[mark:] if e["event"] == "signal"] == [1, 2]
