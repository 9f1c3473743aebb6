"""Proxy mode with real peers: SIPp as the Group Chat client and as the pool.

The daemon runs with ``--mode proxy`` and finds the pool through NSD serving
tests/integration/dns/proxy.zone.in, rendered per test with the ports its
SIPp pool members listen on (127.0.0.2 and up).  Every SIPp logs the exact
bytes it sent and received (``-trace_msg``), so a message the pool received
is compared with the one the client sent: they may differ only where RFC 3261
§16.6 lets a proxy change a request (one new top Via, Max-Forwards minus one,
its Record-Route added, its own Route removed) and §18.2.1 / RFC 3581 let the
receiving transport mark the sender's Via (``received``, ``rport``); a
response loses only pcproxy's Via (§16.7 step 3).  Anything else (Call-ID,
tags, epid, Proxy-Authorization, ms-* headers, header order and spelling,
bodies) must pass byte for byte: it is signed downstream.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import (
    Daemon,
    SippPeer,
    TracedMessage,
    cli,
    free_port,
    sipp,
    start_daemon,
    start_sipp,
)
from .nsd import DnsServer, render_zone, start_nsd

pytestmark = pytest.mark.integration

DOMAIN = "contoso.com"
CONFIG = """\
[proxy]
target_timeout = 1.0
failure_ttl = 30.0
record_route = true

[dns]
timeout = 0.5
lifetime = 1.0
"""
"""Fail over after one second of silence; DNS gives up after one second."""

MEMBER = {
    "SRV_PORT": "127.0.0.2",
    "A_PORT": "127.0.0.3",
    "REFUSE_DEAD_PORT": "127.0.0.2",
    "REFUSE_LIVE_PORT": "127.0.0.3",
    "BUSY_503_PORT": "127.0.0.4",
    "BUSY_LIVE_PORT": "127.0.0.5",
    "SLOW_SILENT_PORT": "127.0.0.2",
    "SLOW_LIVE_PORT": "127.0.0.3",
    "DOWN_DEAD_PORT": "127.0.0.2",
    "DOWN_SILENT_PORT": "127.0.0.3",
    "SHORT_PORT": "127.0.0.6",
    "V6_PORT": "::1",
}
"""Each port of the zone template and the pool member address it belongs to."""


# --- the network: DNS, table, daemon -------------------------------------------------
@dataclass
class PoolNet:
    """The zone as rendered for one test: NSD and the pool members' ports."""

    nsd: DnsServer
    ports: dict[str, int]

    def member(self, name: str) -> tuple[str, int]:
        return MEMBER[name], self.ports[name]


@pytest.fixture
def pool_net(tmp_path: Path) -> Iterator[PoolNet]:
    ports = {name: free_port(host) for name, host in MEMBER.items()}
    render_zone("proxy.zone.in", tmp_path / "zone", ports)
    server = start_nsd(tmp_path / "nsd", tmp_path / "zone")
    yield PoolNet(server, ports)
    server.stop()


@pytest.fixture
def proxy_table(tmp_path: Path, pool_net: PoolNet) -> Path:
    """One endpoint per pool of the zone, imported in one command; an empty
    Mode inherits the daemon's (proxy)."""
    db = tmp_path / "proxy.db"
    rows = [
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport",
        "sip:ocschat@contoso.com,pool-srv.pcproxy.test,,,,",
        "sip:pairchat@contoso.com,pool-a.pcproxy.test,,,%d,tcp" % pool_net.ports["A_PORT"],
        "sip:refusechat@contoso.com,pool-refuse.pcproxy.test,,,,",
        "sip:busychat@contoso.com,pool-busy.pcproxy.test,,,,",
        "sip:slowchat@contoso.com,pool-slow.pcproxy.test,,,,",
        "sip:downchat@contoso.com,pool-down.pcproxy.test,,,,",
        "sip:shortchat@contoso.com,pool-short.pcproxy.test,,,,tcp",
        "sip:v6chat@contoso.com,pool-v6.pcproxy.test,,,,",
        "sip:legacychat@contoso.com,pcpool.contoso.com,,redirect,,",
    ]
    csv = tmp_path / "endpoints.csv"
    csv.write_text("\n".join(rows) + "\n")
    done = cli("endpoint", "import", str(csv), db=db)
    assert done.returncode == 0, done.stderr
    return db


def start_proxy(
    table: Path,
    pool_net: PoolNet,
    tmp_path: Path,
    *extra: str,
    config: str = CONFIG,
    host: str = "127.0.0.1",
    workers: int = 1,
) -> Daemon:
    """The daemon in proxy mode on ``host``, finding pools through the
    test's NSD, with ``config`` as its file."""
    path = tmp_path / "proxy.toml"
    path.write_text(config)
    return start_daemon(
        table,
        host,
        "--mode",
        "proxy",
        "--nameserver",
        pool_net.nsd.nameserver,
        "--config",
        str(path),
        *extra,
        workers=workers,
    )


@pytest.fixture
def proxy_daemon(tmp_path: Path, pool_net: PoolNet, proxy_table: Path) -> Iterator[Daemon]:
    daemon = start_proxy(proxy_table, pool_net, tmp_path)
    yield daemon
    if daemon.proc.poll() is None:
        daemon.stop()


def pool_member(
    pool_net: PoolNet, name: str, scenario: str, workdir: Path, *, calls: int = 1
) -> SippPeer:
    host, port = pool_net.member(name)
    label = "pool-" + name.lower().removesuffix("_port").replace("_", "-")
    return start_sipp(scenario, workdir, label, host=host, port=port, calls=calls)


def client(
    daemon: Daemon,
    scenario: str,
    workdir: Path,
    *,
    service: str = "ocschat",
    transport: str = "tcp",
    calls: int = 1,
    name: str = "client",
) -> SippPeer:
    return start_sipp(
        scenario,
        workdir,
        name,
        host="127.0.0.1",
        transport=transport,
        remote="127.0.0.1:%d" % daemon.port,
        calls=calls,
        service=service,
        keys={"domain": DOMAIN},
        timeout=30,
    )


def explain(daemon: Daemon, *peers: SippPeer) -> str:
    """Everything to read when a call through pcproxy went wrong."""
    with daemon.lock:
        events = daemon.events[-40:]
    return "\n".join(
        [*(p.describe() for p in peers), "--- pcproxy log (last 40):", *map(str, events)]
    )


def run_calls(daemon: Daemon, caller: SippPeer, *members: SippPeer) -> None:
    """Wait for the client, then for every member that must have finished its calls."""
    result = caller.wait()
    done = [m.wait(15) for m in members]
    assert result.returncode == 0, explain(daemon, caller, *members)
    for member, outcome in zip(members, done, strict=True):
        assert outcome.returncode == 0, explain(daemon, caller, member)


# --- what RFC 3261 §16.6 lets a proxy change -------------------------------------------
def split_message(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    return start, lines, body


def header_name(line: bytes) -> bytes:
    name = line.split(b":", 1)[0].strip().lower()
    return {b"v": b"via", b"l": b"content-length"}.get(name, name)


def split_first_value(value: bytes) -> tuple[bytes, bytes | None]:
    """The first value of a comma list and the rest (quote and <> aware)."""
    quoted = False
    angle = 0
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if quoted:
            if c == b"\\":
                i += 1
            elif c == b'"':
                quoted = False
        elif c == b'"':
            quoted = True
        elif c == b"<":
            angle += 1
        elif c == b">":
            angle = max(0, angle - 1)
        elif c == b"," and angle == 0:
            return value[:i].strip(), value[i + 1 :].lstrip()
        i += 1
    return value.strip(), None


def pop_values(
    lines: list[bytes], name: bytes, accept: Callable[[bytes], bool], limit: int
) -> tuple[list[bytes], list[bytes]]:
    """Take up to ``limit`` values of header ``name`` from the top of its list
    while ``accept`` says they are pcproxy's; a line left with values keeps
    its own name and spacing."""
    popped: list[bytes] = []
    out = list(lines)
    i = 0
    while i < len(out) and len(popped) < limit:
        if header_name(out[i]) != name:
            i += 1
            continue
        prefix, _, value = out[i].partition(b":")
        head = prefix + b":" + value[: len(value) - len(value.lstrip())]
        rest: bytes | None = value.strip()
        while rest is not None and len(popped) < limit:
            first, remainder = split_first_value(rest)
            if not accept(first):
                break
            popped.append(first)
            rest = remainder
        if rest is None:
            del out[i]
            continue
        out[i] = head + rest
        break
    return popped, out


def normalise_via(line: bytes) -> bytes:
    """What §18.2.1 and RFC 3581 let the receiving transport add to a Via."""
    if header_name(line) != b"via":
        return line
    return re.sub(rb";rport=\d+", b";rport", re.sub(rb";received=[^;,\s]*", b"", line))


def max_forwards(lines: list[bytes]) -> tuple[int, int]:
    """(index, value) of the Max-Forwards line."""
    found = [i for i, line in enumerate(lines) if header_name(line) == b"max-forwards"]
    assert len(found) == 1, lines
    return found[0], int(lines[found[0]].split(b":", 1)[1])


def is_pcproxy_uri(port: int) -> Callable[[bytes], bool]:
    """A Route/Record-Route value of pcproxy: ``<sip:[TOKEN@]127.0.0.1:P;...;lr...>``."""
    pattern = re.compile(rb"^<sip:(?:[^@>]*@)?127\.0\.0\.1:%d[;>](?:[^>]*;)?lr[;>=]" % port)
    return lambda value: pattern.match(value) is not None


def assert_forwarded_request(
    sent: bytes, received: bytes, daemon: Daemon, *, record_routes: tuple[int, ...] = (0,)
) -> list[bytes]:
    """``received`` is ``sent`` as RFC 3261 §16.6 lets pcproxy forward it, with
    as many Record-Route values of pcproxy's as ``record_routes`` allows;
    returns them."""
    s_start, s_lines, s_body = split_message(sent)
    r_start, r_lines, r_body = split_message(received)
    what = s_start.decode(errors="replace")
    assert r_start == s_start, "%s: Request-URI changed to %r" % (what, r_start)
    assert r_body == s_body, "%s: body changed (%d -> %d bytes)" % (what, len(s_body), len(r_body))
    sender_via = next(
        split_first_value(line.partition(b":")[2])[0]
        for line in s_lines
        if header_name(line) == b"via"
    )
    vias, r_lines = pop_values(
        r_lines, b"via", lambda v: v != sender_via and b";branch=z9hG4bK" in v, 1
    )
    assert len(vias) == 1, "%s: no new top Via: %r" % (what, r_lines)
    ours = is_pcproxy_uri(daemon.port)
    record_route, r_lines = pop_values(r_lines, b"record-route", ours, 2)
    assert len(record_route) in record_routes, "%s: Record-Route %r" % (what, record_route)
    route, s_lines = pop_values(s_lines, b"route", ours, 2)
    assert not [
        line
        for line in r_lines
        if header_name(line) == b"route" and ours(line.partition(b":")[2].strip())
    ], "%s: pcproxy's own Route forwarded" % what
    s_index, s_value = max_forwards(s_lines)
    r_index, r_value = max_forwards(r_lines)
    assert r_value == s_value - 1, "%s: Max-Forwards %d -> %d" % (what, s_value, r_value)
    r_lines[r_index] = s_lines[s_index]
    expected = [normalise_via(line) for line in s_lines]
    got = [normalise_via(line) for line in r_lines]
    assert got == expected, "%s: header lines differ beyond §16.6:\n%s" % (
        what,
        "\n".join(
            "sent     %r\nreceived %r" % pair
            for pair in zip(expected, got, strict=False)
            if pair[0] != pair[1]
        )
        or "sent %d lines, received %d" % (len(expected), len(got)),
    )
    return record_route


def assert_forwarded_response(sent: bytes, received: bytes, daemon: Daemon) -> None:
    """``received`` is ``sent`` less its top Via, pcproxy's (§16.7 step 3)."""
    s_start, s_lines, s_body = split_message(sent)
    r_start, r_lines, r_body = split_message(received)
    what = s_start.decode(errors="replace")
    assert r_start == s_start and r_body == s_body, what
    vias, s_lines = pop_values(s_lines, b"via", lambda v: b";branch=z9hG4bK" in v, 1)
    assert len(vias) == 1, what
    assert r_lines == s_lines, "%s: header lines differ beyond pcproxy's Via:\n%r\n%r" % (
        what,
        s_lines,
        r_lines,
    )


Key = tuple[bytes, bytes, bytes]


def message_key(message: TracedMessage) -> Key:
    """(Call-ID, CSeq, method or status): one message of one call."""
    start = message.first_line
    words = start.split(b" ")
    kind = words[1] if start.startswith(b"SIP/2.0 ") else words[0]
    return (message.header("Call-ID") or b"", message.header("CSeq") or b"", kind)


def by_key(messages: list[TracedMessage], direction: str) -> dict[Key, list[bytes]]:
    found: dict[Key, list[bytes]] = defaultdict(list)
    for message in messages:
        if message.direction == direction:
            found[message_key(message)].append(message.data)
    return found


def is_request(key: Key) -> bool:
    return not key[2].isdigit()


Traffic = dict[Key, list[bytes]]


def traffic(caller: SippPeer, pool: SippPeer) -> tuple[Traffic, Traffic, Traffic, Traffic]:
    """What the client sent and received, then what the pool sent and received."""
    client, member = caller.messages(), pool.messages()
    return (
        by_key(client, "sent"),
        by_key(client, "received"),
        by_key(member, "sent"),
        by_key(member, "received"),
    )


# --- the Group Chat flow ---------------------------------------------------------------
def test_group_chat_flow_over_tcp_passes_byte_for_byte(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    calls = 3
    pool = pool_member(pool_net, "SRV_PORT", "gc_pool.xml", tmp_path, calls=calls)
    caller = client(proxy_daemon, "gc_client.xml", tmp_path, calls=calls)
    run_calls(proxy_daemon, caller, pool)

    client_sent, client_received, pool_sent, pool_received = traffic(caller, pool)
    # every message of every call arrived once, and nothing else did
    assert sorted(pool_received) == sorted(client_sent)
    assert sorted(k for k in client_received if k[2] != b"100") == sorted(pool_sent)
    assert len(client_sent) == calls * 6  # INVITE ACK INFO 200 UPDATE BYE
    infos = [k for k in client_sent if k[2] == b"INFO"]
    assert len(infos) == calls and all(len(client_sent[k][0]) > 12 * 1024 for k in infos)

    for key, [sent] in client_sent.items():  # client -> pool
        [received] = pool_received[key]
        if not is_request(key):
            assert_forwarded_response(sent, received, proxy_daemon)
        elif key[2] == b"INVITE":
            # one Record-Route, or two (RFC 5658 double Record-Route: one per side)
            assert_forwarded_request(sent, received, proxy_daemon, record_routes=(1, 2))
        else:
            assert_forwarded_request(sent, received, proxy_daemon)
    for key, [sent] in pool_sent.items():  # pool -> client
        [received] = client_received[key]
        if is_request(key):  # the pool's own INFO, routed back over the client's connection
            assert_forwarded_request(sent, received, proxy_daemon)
        else:
            assert_forwarded_response(sent, received, proxy_daemon)
    # pcproxy answers the INVITE itself with 100 Trying (RFC 3261 §16.2)
    trying = [k for k in client_received if k[2] == b"100"]
    assert len(trying) == calls and all(k[1] == b"1 INVITE" for k in trying)


def test_udp_client_reaches_a_tcp_pool_with_two_record_routes(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    calls = 3
    pool = pool_member(pool_net, "SRV_PORT", "pool_call.xml", tmp_path, calls=calls)
    caller = client(proxy_daemon, "gc_call.xml", tmp_path, transport="udp", calls=calls)
    run_calls(proxy_daemon, caller, pool)

    client_sent, client_received, pool_sent, pool_received = traffic(caller, pool)
    assert {m.transport for m in pool.messages()} == {"TCP"}
    assert {m.transport for m in caller.messages()} == {"UDP"}
    assert sorted(pool_received) == sorted(client_sent)  # INVITE ACK BYE of each call
    for key, copies in client_sent.items():  # the first copy: UDP may retransmit
        # transport switch: one Record-Route per side (RFC 3261 §16.6 step 4, RFC 5658)
        expected = (2,) if key[2] == b"INVITE" else (0,)
        assert_forwarded_request(
            copies[0], pool_received[key][0], proxy_daemon, record_routes=expected
        )
    for key, [response] in pool_sent.items():  # 200 to INVITE and to BYE
        assert client_received[key], "%r never reached the client" % (key,)
        assert_forwarded_response(response, client_received[key][0], proxy_daemon)


# --- failover (RFC 3263 §4.3) ----------------------------------------------------------
def test_refused_connection_fails_over_to_the_next_address(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    # pool-a: A 127.0.0.2 (nobody listens on the endpoint's port), A 127.0.0.3 serves
    pool = pool_member(pool_net, "A_PORT", "pool_call.xml", tmp_path, calls=2)
    caller = client(proxy_daemon, "gc_call.xml", tmp_path, service="pairchat", calls=2)
    run_calls(proxy_daemon, caller, pool)
    proxy_daemon.wait_for("connect_failed", peer="tcp:127.0.0.2:%d" % pool.port, timeout=1)


def test_refused_srv_target_fails_over_to_the_next_priority(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    pool = pool_member(pool_net, "REFUSE_LIVE_PORT", "pool_call.xml", tmp_path, calls=2)
    caller = client(proxy_daemon, "gc_call.xml", tmp_path, service="refusechat", calls=2)
    run_calls(proxy_daemon, caller, pool)
    dead = "tcp:%s:%d" % pool_net.member("REFUSE_DEAD_PORT")
    proxy_daemon.wait_for("connect_failed", peer=dead, timeout=1)


def test_srv_target_answering_503_fails_over_to_the_next(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    busy = pool_member(pool_net, "BUSY_503_PORT", "pool_503.xml", tmp_path)
    live = pool_member(pool_net, "BUSY_LIVE_PORT", "pool_call.xml", tmp_path, calls=2)
    caller = client(proxy_daemon, "gc_call.xml", tmp_path, service="busychat", calls=2)
    run_calls(proxy_daemon, caller, busy, live)
    # the member's 503 is pcproxy's business, not the client's
    statuses = {message_key(m)[2] for m in caller.messages() if m.direction == "received"}
    assert b"503" not in statuses, explain(proxy_daemon, caller)


class SilentMember:
    """A pool member that accepts TCP connections and never answers: what
    pcproxy received is kept in ``received``.  Bounded: it stops after 60 s."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port), backlog=8)
        self.received = bytearray()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            self.listener.setblocking(False)
            selector.register(self.listener, selectors.EVENT_READ)
            while not self.stopped.is_set() and time.monotonic() < deadline:
                for ready, _ in selector.select(0.1):
                    sock = ready.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        conn, _ = self.listener.accept()
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(sock)
                        sock.close()
                    with self.lock:
                        self.received += data
            for key in list(selector.get_map().values()):
                if key.fileobj is not self.listener:
                    assert isinstance(key.fileobj, socket.socket)
                    key.fileobj.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


def test_silent_srv_target_fails_over_after_target_timeout(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    silent = SilentMember(*pool_net.member("SLOW_SILENT_PORT"))
    try:
        live = pool_member(pool_net, "SLOW_LIVE_PORT", "pool_call.xml", tmp_path)
        caller = client(proxy_daemon, "gc_call.xml", tmp_path, service="slowchat", transport="udp")
        run_calls(proxy_daemon, caller, live)
    finally:
        silent.close()
    assert b"INVITE sip:slowchat@contoso.com SIP/2.0" in silent.received  # it was tried first


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_every_member_down_gets_a_final_error_with_ms_diagnostics(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path, transport: str
) -> None:
    # pool-down: 127.0.0.2 refuses the connection, 127.0.0.3 accepts and never answers
    silent = SilentMember(*pool_net.member("DOWN_SILENT_PORT"))
    try:
        caller = client(
            proxy_daemon, "gc_fail.xml", tmp_path, service="downchat", transport=transport
        )
        result = caller.wait()
    finally:
        silent.close()
    assert result.returncode == 0, explain(proxy_daemon, caller)
    # both were tried: the first refused, the second got the INVITE
    dead = "tcp:%s:%d" % pool_net.member("DOWN_DEAD_PORT")
    proxy_daemon.wait_for("connect_failed", peer=dead, timeout=1)
    assert b"INVITE sip:downchat@contoso.com SIP/2.0" in silent.received
    [final] = [
        m
        for m in caller.messages()
        if m.direction == "received" and message_key(m)[2] in (b"408", b"503")
    ][:1]
    diagnostics = final.header("ms-diagnostics")
    assert diagnostics is not None and re.match(rb'\d+;.*reason="[^"]+"', diagnostics), final.data
    if message_key(final)[2] == b"503":
        assert final.header("Retry-After") is not None, final.data


def test_calls_keep_flowing_when_the_dns_server_stops(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    # pool-short: SRV and A records with a TTL of one second
    pool = pool_member(pool_net, "SHORT_PORT", "pool_call.xml", tmp_path, calls=4)
    warm = client(proxy_daemon, "gc_call.xml", tmp_path, service="shortchat", name="warm")
    result = warm.wait()
    assert result.returncode == 0, explain(proxy_daemon, warm, pool)

    pool_net.nsd.stop()
    time.sleep(2.0)  # past the TTL: what pcproxy holds is stale now (RFC 8767)
    cold = client(proxy_daemon, "gc_call.xml", tmp_path, service="shortchat", calls=3, name="cold")
    run_calls(proxy_daemon, cold, pool)


# --- what proxy mode leaves as it was ----------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_unknown_uri_still_gets_404_in_proxy_mode(
    proxy_daemon: Daemon, tmp_path: Path, transport: str
) -> None:
    result = sipp(
        "invite_final.xml",
        proxy_daemon,
        transport,
        service="nobody",
        tmp=tmp_path,
        expect={
            "status": "404",
            "hdr": "ms-diagnostics:",
            "hdr_re": r'reason="No persistent chat endpoint for nobody@contoso\.com"',
        },
        keys={"max_forwards": "70", "extra": "Subject: test"},
    )
    assert result.returncode == 0, result.errors


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_redirect_endpoint_still_gets_302_when_the_default_is_proxy(
    proxy_daemon: Daemon, tmp_path: Path, transport: str
) -> None:
    result = sipp(
        "redirect.xml",
        proxy_daemon,
        transport,
        service="legacychat",
        tmp=tmp_path,
        expect={"contact": r"^ *<sip:legacychat@pcpool\.contoso\.com> *$"},
    )
    assert result.returncode == 0, result.errors


# --- SUBSCRIBE and CANCEL end to end -------------------------------------------------
def top_via(message: bytes) -> bytes:
    _, lines, _ = split_message(message)
    value = next(line.partition(b":")[2] for line in lines if header_name(line) == b"via")
    return split_first_value(value)[0]


def test_subscribe_is_proxied_and_the_pools_notify_routed_back(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    calls = 2
    pool = pool_member(pool_net, "SRV_PORT", "sub_pool.xml", tmp_path, calls=calls)
    caller = client(proxy_daemon, "sub_client.xml", tmp_path, transport="udp", calls=calls)
    run_calls(proxy_daemon, caller, pool)

    client_sent, client_received, pool_sent, pool_received = traffic(caller, pool)
    assert sorted(pool_received) == sorted(client_sent)  # SUBSCRIBE, 200 to NOTIFY, un-SUBSCRIBE
    assert sorted(client_received) == sorted(pool_sent)  # 202, NOTIFY, 200: no 100 to SUBSCRIBE
    for key, copies in client_sent.items():
        if not is_request(key):
            assert_forwarded_response(copies[0], pool_received[key][0], proxy_daemon)
        elif key[1] == b"1 SUBSCRIBE":  # dialog-creating: UDP in, TCP out, one RR per side
            assert_forwarded_request(
                copies[0], pool_received[key][0], proxy_daemon, record_routes=(2,)
            )
        else:
            assert_forwarded_request(copies[0], pool_received[key][0], proxy_daemon)
    for key, [sent] in pool_sent.items():
        if is_request(key):  # the NOTIFY, over the client's flow
            assert_forwarded_request(sent, client_received[key][0], proxy_daemon)
        else:
            assert_forwarded_response(sent, client_received[key][0], proxy_daemon)


def test_cancel_of_a_ringing_invite_reaches_the_pool_and_487_the_client(
    proxy_daemon: Daemon, pool_net: PoolNet, tmp_path: Path
) -> None:
    pool = pool_member(pool_net, "SRV_PORT", "cancel_pool.xml", tmp_path)
    caller = client(proxy_daemon, "cancel_client.xml", tmp_path, transport="udp")
    run_calls(proxy_daemon, caller, pool)

    received = by_key(pool.messages(), "received")
    [invite] = [copies[0] for key, copies in received.items() if key[2] == b"INVITE"]
    [cancel] = [copies[0] for key, copies in received.items() if key[2] == b"CANCEL"]
    [ack] = [copies[0] for key, copies in received.items() if key[2] == b"ACK"]
    # §9.1 / §16.10: pcproxy's CANCEL and its ACK for the 487 (§17.1.1.3)
    # carry the branch of the INVITE it forwarded, not the client's
    assert top_via(cancel) == top_via(invite) == top_via(ack)
    client_sent = by_key(caller.messages(), "sent")
    client_via = top_via(next(c[0] for k, c in client_sent.items() if k[2] == b"INVITE"))
    assert top_via(invite) != client_via
    statuses = sorted(k[2] for k in by_key(caller.messages(), "received"))
    assert b"487" in statuses and b"200" in statuses


def test_ipv6_client_reaches_an_ipv6_only_pool(
    pool_net: PoolNet, proxy_table: Path, tmp_path: Path
) -> None:
    daemon = start_proxy(proxy_table, pool_net, tmp_path, host="::1")
    try:
        pool = pool_member(pool_net, "V6_PORT", "pool_call.xml", tmp_path)
        caller = start_sipp(
            "gc_call.xml",
            tmp_path,
            "client-v6",
            host="::1",
            transport="udp",
            remote="[::1]:%d" % daemon.port,
            service="v6chat",
            keys={"domain": DOMAIN},
        )
        run_calls(daemon, caller, pool)
    finally:
        daemon.stop()
    [invite] = [
        copies[0]
        for key, copies in by_key(pool.messages(), "received").items()
        if key[2] == b"INVITE"
    ]
    # both of pcproxy's Record-Route URIs name its IPv6 listener (RFC 5118 §4.1)
    _, lines, _ = split_message(invite)
    record_route = b",".join(
        line.partition(b":")[2] for line in lines if header_name(line) == b"record-route"
    )
    assert record_route.count(b"[::1]:%d" % daemon.port) == 2, record_route
