"""Integration fixtures: the real daemon and real peers on loopback.

The daemon runs as ``pcproxy serve`` in a subprocess on ports chosen at run
time; SIPp (Debian ``sip-tester``) plays the legacy client.  Only processes
started here are stopped, by their PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import pytest

SCENARIOS = Path(__file__).parent / "scenarios"
PCPROXY = [sys.executable, "-m", "proxy"]
SIPP = shutil.which("sipp")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port")


def cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    """Run ``pcproxy ARGS --db DB`` the way an operator does."""
    return subprocess.run(
        [*PCPROXY, *args, "--db", str(db)], capture_output=True, text=True, timeout=30, check=False
    )


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    port: int
    host: str
    db: Path
    events: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(
        self, event: str, timeout: float = 5.0, since: int = 0, **match: object
    ) -> dict[str, object]:
        """The first log event named ``event`` (after index ``since``) with ``match``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for ev in self.events[since:]:
                    if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                        return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            "no %r event %r within %.1fs; log: %s" % (event, match, timeout, self.events[-10:])
        )

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def hup(self) -> int:
        """Send SIGHUP (a reload); return the mark of the events before it."""
        mark = self.mark()
        os.kill(self.proc.pid, signal.SIGHUP)
        return mark

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise


def _read_log(daemon: Daemon) -> None:
    assert daemon.proc.stdout is not None
    for line in daemon.proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            ev = {"event": "unparsed", "line": line.rstrip()}
        with daemon.lock:
            daemon.events.append(ev)


def start_daemon(db: Path, host: str = "127.0.0.1", *extra: str, workers: int = 1) -> Daemon:
    """``pcproxy serve`` on a free port (UDP and TCP); one process unless
    ``workers`` says otherwise, ready (every worker ready) when this returns."""
    port = free_port(host)
    bracket = "[%s]" % host if ":" in host else host
    proc = subprocess.Popen(
        [
            *PCPROXY,
            "serve",
            "--db",
            str(db),
            "--listen",
            "udp:%s:%d" % (bracket, port),
            "--listen",
            "tcp:%s:%d" % (bracket, port),
            "--log-level",
            "info",
            "--workers",
            str(workers),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    daemon = Daemon(proc, port, host, db)
    threading.Thread(target=_read_log, args=(daemon,), daemon=True).start()
    try:
        daemon.wait_for("ready", timeout=15, worker=None)
    except AssertionError:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """An endpoint table as an operator would set one up."""
    db = tmp_path / "pcproxy.db"
    for args in (
        ("--sip-address", "sip:ocschat@contoso.com", "--pool-fqdn", "pcpool.contoso.com"),
        (
            "--sip-address",
            "sip:GroupChat@Fabrikam.com",
            "--pool-fqdn",
            "pcpool.fabrikam.com",
            "--pool-port",
            "5041",
            "--pool-transport",
            "tls",
            "--display-name",
            "Fabrikam chat",
        ),
    ):
        done = cli("endpoint", "new", *args, db=db)
        assert done.returncode == 0, done.stderr
    return db


@pytest.fixture
def daemon(table: Path) -> Iterator[Daemon]:
    d = start_daemon(table, "127.0.0.1", "--mode", "redirect")
    yield d
    if d.proc.poll() is None:
        d.stop()


@dataclass
class SippResult:
    returncode: int
    stdout: str
    errors: str


def sipp(
    scenario: str,
    daemon: Daemon,
    transport: str = "udp",
    *,
    service: str = "ocschat",
    domain: str = "contoso.com",
    calls: int = 1,
    keys: dict[str, str] | None = None,
    timeout: float = 20.0,
    tmp: Path | None = None,
    method: str | None = None,
    expect: dict[str, str] | None = None,
    socket_per_call: bool = False,
) -> SippResult:
    """Run one bounded SIPp UAC scenario against the daemon; rc 0 = all calls passed.

    ``keys`` go to SIPp (``-key``) for the message text.  SIPp takes no
    keyword for the method nor in XML attributes, so ``method`` and
    ``expect`` (``[status]``, ``[hdr]``, ``[hdr_re]``, ``[contact]``) are
    written into a copy of the scenario.  ``socket_per_call``: each call from
    its own UDP port or TCP connection (SIPp ``-t un`` / ``-t tn``).
    """
    if SIPP is None:
        pytest.fail("sipp is not installed: run scripts/test (apt-get install sip-tester)")
    workdir = Path(tmp or Path(os.environ.get("TMPDIR", "/tmp")))
    path = SCENARIOS / scenario
    subst = {"method": method} if method is not None else {}
    subst.update({k: xml_escape(v, {'"': "&quot;"}) for k, v in (expect or {}).items()})
    if subst:
        text = path.read_text()
        for name, value in subst.items():
            text = text.replace("[%s]" % name, value)
        path = workdir / ("%d-%s" % (len(list(workdir.iterdir())), scenario))
        path.write_text(text)
    host = daemon.host
    target = "[%s]:%d" % (host, daemon.port) if ":" in host else "%s:%d" % (host, daemon.port)
    cmd = [
        SIPP,
        target,
        "-sf",
        str(path),
        "-s",
        service,
        "-key",
        "domain",
        domain,
        "-i",
        host,
        "-p",
        "0",
        "-m",
        str(calls),
        "-r",
        "50",
        "-t",
        ("u" if transport == "udp" else "t") + ("n" if socket_per_call else "1"),
        "-timeout",
        "%ds" % int(timeout),
        "-timeout_error",
        "-recv_timeout",
        "5000",
        "-nostdin",
        "-trace_err",
        "-error_file",
        str(workdir / ("sipp-%s.err" % os.getpid())),
        "-mp",
        str(free_port(host)),
        # SIPp's control socket on loopback too, not 0.0.0.0
        "-ci",
        "127.0.0.1",
        "-cp",
        str(free_port()),
    ]
    if socket_per_call:
        cmd += ["-max_socket", "1000"]
    for k, v in (keys or {}).items():
        cmd += ["-key", k, v]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        check=False,
    )
    err_file = workdir / ("sipp-%s.err" % os.getpid())
    errors = err_file.read_text(errors="replace") if err_file.exists() else ""
    err_file.unlink(missing_ok=True)
    return SippResult(done.returncode, done.stdout[-3000:], errors[-3000:])


# --- SIPp as a peer of its own: the client and the pool members of proxy mode ---------
@dataclass(frozen=True)
class TracedMessage:
    """One message as SIPp logged it with ``-trace_msg``: the exact bytes."""

    direction: str  # "sent" or "received"
    transport: str  # "UDP", "TCP", "TLS"
    data: bytes

    @property
    def first_line(self) -> bytes:
        return self.data.split(b"\r\n", 1)[0]

    def header(self, name: str) -> bytes | None:
        """The value of the first header line called ``name`` (no compact form)."""
        head = self.data.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == name.lower().encode():
                return value.strip()
        return None


_TRACE_ENTRY = re.compile(
    rb"^-{47} [^\n]*\n(UDP|TCP|TLS) message (sent|received)"
    rb" (?:\((\d+) bytes\)|\[(\d+)\] bytes) ?:\n\n",
    re.M,
)


def traced_messages(path: Path) -> list[TracedMessage]:
    """The messages of a SIPp ``-message_file``: each entry gives its byte count,
    so a message is taken exactly, body and all."""
    data = path.read_bytes() if path.exists() else b""
    found: list[TracedMessage] = []
    for m in _TRACE_ENTRY.finditer(data):
        size = int(m.group(3) or m.group(4))
        found.append(
            TracedMessage(m.group(2).decode(), m.group(1).decode(), data[m.end() :][:size])
        )
    return found


def wait_listening(host: str, port: int, transport: str, timeout: float = 10.0) -> bool:
    """Whether something listens on ``host:port`` within ``timeout``, read
    from /proc/net without touching the port (an address there is written
    32-bit word by word, each in host byte order)."""
    v6 = ":" in host
    packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, host)
    words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    table = Path("/proc/net/%s%s" % ("tcp" if transport == "tcp" else "udp", "6" if v6 else ""))
    local = "%s:%04X" % (words.hex().upper(), port)
    state = "0A" if transport == "tcp" else "07"  # LISTEN, or an unconnected UDP socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == state:
                return True
        time.sleep(0.02)
    return False


SIPP_FILES = ("messages", "errors", "screen")
"""What a ``SippPeer`` named N leaves in its workdir: N.messages (-trace_msg),
N.errors (-trace_err), N.screen (its stdout)."""


@dataclass
class SippPeer:
    """A SIPp process run in the background, as the client or as a pool member.

    Its message trace, error file and screen go to ``workdir/<name>.*``; it is
    bounded by ``-timeout`` and stopped by its PID.
    """

    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    transport: str
    workdir: Path
    timeout: float

    @property
    def trace(self) -> Path:
        return self.workdir / ("%s.%s" % (self.name, SIPP_FILES[0]))

    @property
    def error_file(self) -> Path:
        return self.workdir / ("%s.%s" % (self.name, SIPP_FILES[1]))

    @property
    def screen(self) -> Path:
        return self.workdir / ("%s.%s" % (self.name, SIPP_FILES[2]))

    def wait(self, timeout: float | None = None) -> SippResult:
        """Its exit (0: every call passed), its screen and its errors."""
        try:
            code = self.proc.wait(self.timeout + 10 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        screen = self.screen.read_text(errors="replace") if self.screen.exists() else ""
        errors = self.error_file.read_text(errors="replace") if self.error_file.exists() else ""
        return SippResult(code, screen[-3000:], errors[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def messages(self) -> list[TracedMessage]:
        return traced_messages(self.trace)

    def describe(self) -> str:
        """What to read when a call failed: errors and the message trace."""
        result = self.wait(0) if self.proc.poll() is not None else None
        trace = self.trace.read_bytes().decode(errors="replace") if self.trace.exists() else ""
        return "--- SIPp %s (%s:%d/%s) exit %s\nerrors:\n%s\ntrace:\n%s" % (
            self.name,
            self.host,
            self.port,
            self.transport,
            None if result is None else result.returncode,
            "" if result is None else result.errors,
            trace[-6000:],
        )


def start_sipp(
    scenario: str,
    workdir: Path,
    name: str,
    *,
    host: str,
    port: int | None = None,
    transport: str = "tcp",
    remote: str | None = None,
    calls: int = 1,
    rate: int = 10,
    timeout: float = 30.0,
    recv_timeout: float = 10.0,
    service: str | None = None,
    keys: dict[str, str] | None = None,
) -> SippPeer:
    """Start SIPp on ``host:port`` (a free port if none): a UAS waiting for
    ``calls`` calls when ``remote`` is None, else a UAC calling ``remote``
    (``service`` is the user part of its Request-URI, SIPp's ``-s``).

    Everything SIPp binds is on ``host`` (``-bind_local``, media and control
    ports too); ``-m``, ``-timeout`` and ``-recv_timeout`` bound it.  A UAS is
    listening when this returns.
    """
    if SIPP is None:
        pytest.fail("sipp is not installed: run scripts/test (apt-get install sip-tester)")
    port = port or free_port(host)
    trace, error_file, screen = (workdir / ("%s.%s" % (name, x)) for x in SIPP_FILES)
    cmd = [SIPP, *([remote] if remote else []), "-sf", str(SCENARIOS / scenario)]
    cmd += ["-s", service] if service else []
    cmd += ["-i", host, "-p", str(port), "-bind_local", "-t", "t1" if transport == "tcp" else "u1"]
    cmd += ["-m", str(calls), "-r", str(rate), "-l", str(calls)]
    cmd += ["-timeout", "%ds" % int(timeout), "-timeout_error"]
    cmd += ["-recv_timeout", str(int(recv_timeout * 1000)), "-nostdin"]
    cmd += ["-trace_msg", "-message_file", str(trace)]
    cmd += ["-trace_err", "-error_file", str(error_file)]
    control = "127.0.0.1" if ":" in host else host  # SIPp's control socket is IPv4 only
    cmd += ["-mi", host, "-mp", str(free_port(host))]
    cmd += ["-ci", control, "-cp", str(free_port(control))]
    for key, value in (keys or {}).items():
        cmd += ["-key", key, value]
    with screen.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir
        )
    peer = SippPeer(name, proc, host, port, transport, workdir, timeout)
    if remote is None and not wait_listening(host, port, transport):
        peer.stop()
        raise AssertionError(
            "SIPp %s did not listen on %s:%d\n%s" % (name, host, port, peer.describe())
        )
    return peer
