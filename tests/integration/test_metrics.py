"""Metrics, health and drain with real peers: the daemon runs with
``--metrics 127.0.0.1:<free port>``, SIPp plays the client and a pool member,
NSD serves the pools (tests/integration/dns/proxy.zone.in), and the test
scrapes ``/metrics`` before and after the traffic and parses it with
prometheus_client's own parser.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Daemon, cli, sipp
from .test_proxy import (  # noqa: F401  (the pool_net fixture)
    DOMAIN,
    PoolNet,
    SilentMember,
    client,
    pool_member,
    pool_net,
    run_calls,
    start_proxy,
)

pytestmark = pytest.mark.integration

CONFIG = """\
[server]
drain_timeout = 60.0

[proxy]
target_timeout = 30.0

[dns]
timeout = 0.5
lifetime = 1.0
"""
"""A silent pool member keeps its INVITE in flight for 30 s, and a drain
waits for it up to a minute: long enough to look at the daemon draining."""

SECRET = "s3cr3t-digest-response"


@pytest.fixture
def observed(tmp_path: Path, pool_net: PoolNet) -> Iterator[tuple[Daemon, int]]:
    """The daemon in proxy mode with three endpoints, and its metrics port."""
    db = tmp_path / "metrics.db"
    csv = tmp_path / "endpoints.csv"
    csv.write_text(
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport\n"
        "sip:ocschat@contoso.com,pool-srv.pcproxy.test,,,,\n"
        "sip:slowchat@contoso.com,pool-slow.pcproxy.test,,,,\n"
        "sip:refusechat@contoso.com,pool-refuse.pcproxy.test,,,,\n"
        "sip:legacychat@contoso.com,pcpool.contoso.com,,redirect,,\n"
    )
    done = cli("endpoint", "import", str(csv), db=db)
    assert done.returncode == 0, done.stderr
    # the metrics port: a free one, as the log says, so no race with the SIP ports
    daemon = start_proxy(db, pool_net, tmp_path, "--metrics", "127.0.0.1:0", config=CONFIG)
    listening = daemon.wait_for("metrics_listening")
    assert listening["host"] == "127.0.0.1"
    yield daemon, int(listening["port"])  # type: ignore[call-overload]
    if daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


# --- HTTP and SIP by hand ---------------------------------------------------------------
def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics, keyed ``name{k=v,...}`` (labels sorted)."""
    status, body = get(port, "/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
            samples["%s{%s}" % (s.name, labels)] = s.value
    return samples


def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


class UdpClient:
    """A SIP client on a UDP socket, for requests SIPp cannot leave hanging."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5.0)
        self.port = self.sock.getsockname()[1]
        self.target = ("127.0.0.1", daemon.port)

    def send(self, method: str, uri: str, branch: str, call_id: str, *extra: str) -> None:
        lines = [
            "%s %s SIP/2.0" % (method, uri),
            "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=%s;rport" % (self.port, branch),
            "Max-Forwards: 70",
            "From: <sip:alice@%s>;tag=a-%s" % (DOMAIN, branch),
            "To: <%s>" % uri,
            "Call-ID: %s" % call_id,
            "CSeq: 1 %s" % method,
            "Contact: <sip:alice@127.0.0.1:%d>" % self.port,
            *extra,
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.target)

    def final(self) -> bytes:
        """The first final response received."""
        while True:
            data = self.sock.recv(65535)
            if not data.startswith(b"SIP/2.0 1"):
                return data

    def ack(self, uri: str, branch: str, call_id: str, final: bytes) -> None:
        """ACK a non-2xx final on the INVITE's branch (RFC 3261 §17.1.1.3)."""
        to = re.search(rb"\r\nTo: ([^\r]*)", final)
        assert to is not None
        lines = [
            "ACK %s SIP/2.0" % uri,
            "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=%s;rport" % (self.port, branch),
            "Max-Forwards: 70",
            "From: <sip:alice@%s>;tag=a-%s" % (DOMAIN, branch),
            "To: %s" % to.group(1).decode(),
            "Call-ID: %s" % call_id,
            "CSeq: 1 ACK",
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.target)

    def close(self) -> None:
        self.sock.close()


# --- the tests -----------------------------------------------------------------------------
def test_counters_move_with_proxied_and_redirected_calls(
    observed: tuple[Daemon, int], pool_net: PoolNet, tmp_path: Path
) -> None:
    daemon, port = observed
    assert get(port, "/healthz") == (200, b"ok\n")
    assert get(port, "/readyz") == (200, b"ready\n")
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/metrics", "POST")[0] == 405
    before = scrape(port)
    mark = daemon.mark()

    pool = pool_member(pool_net, "SRV_PORT", "pool_call.xml", tmp_path)
    caller = client(daemon, "gc_call.xml", tmp_path)
    run_calls(daemon, caller, pool)
    redirected = sipp(
        "redirect.xml",
        daemon,
        "udp",
        service="legacychat",
        tmp=tmp_path,
        expect={"contact": r"^ *<sip:legacychat@pcpool\.contoso\.com> *$"},
    )
    assert redirected.returncode == 0, redirected.errors
    after = scrape(port)

    # retransmissions count as requests received: at least
    assert moved(before, after, "pcproxy_requests_total{method=INVITE}") >= 2
    assert moved(before, after, "pcproxy_requests_total{method=BYE}") >= 1
    assert moved(before, after, "pcproxy_forwards_total{endpoint=sip:ocschat@contoso.com}") == 1
    assert moved(before, after, "pcproxy_redirects_total{endpoint=sip:legacychat@contoso.com}") == 1
    assert moved(before, after, "pcproxy_responses_total{code=302}") == 1
    assert moved(before, after, "pcproxy_forwarded_requests_total{}") >= 2  # INVITE, BYE
    assert moved(before, after, "pcproxy_proxied_answered_total{}") >= 1
    assert moved(before, after, "pcproxy_dns_queries_total{outcome=answer}") >= 2  # SRV, A
    assert moved(before, after, "pcproxy_dns_query_duration_seconds_count{outcome=answer}") >= 2
    assert after["pcproxy_table_endpoints{}"] == 4
    assert "pcproxy_event_loop_lag_seconds_count{}" in after
    assert after["pcproxy_failovers_total{}"] == 0
    # a call that went well is not logged above info level
    with daemon.lock:
        noisy = [ev for ev in daemon.events[mark:] if ev.get("level") != "info"]
    assert noisy == []
    # the lag probe fires every half second on the daemon's loop
    deadline = time.monotonic() + 10.0
    while scrape(port)["pcproxy_event_loop_lag_seconds_count{}"] == 0:
        assert time.monotonic() < deadline, "the event-loop lag probe never fired"
        time.sleep(0.1)


def test_a_pool_nobody_answers_is_logged_with_call_id_branch_and_method_and_no_secret(
    observed: tuple[Daemon, int],
) -> None:
    daemon, port = observed
    before = scrape(port)
    uri, branch, call_id = "sip:refusechat@%s" % DOMAIN, "z9hG4bK-refused1", "refused-1@test"
    sip = UdpClient(daemon)
    try:
        proof = 'Proxy-Authorization: Digest username="alice", response="%s"' % SECRET
        sip.send("INVITE", uri, branch, call_id, proof)
        final = sip.final()
        assert final.startswith(b"SIP/2.0 503 "), final
        sip.ack(uri, branch, call_id, final)
    finally:
        sip.close()
    event = daemon.wait_for("pool_unreachable", call_id=call_id)
    assert event["branch"] == branch and event["method"] == "INVITE"
    assert event["level"] == "warning"
    with daemon.lock:
        failed = [ev for ev in daemon.events if ev.get("event") == "target_failed"]
        assert not any(SECRET in str(ev) for ev in daemon.events)
    assert len(failed) == 2 and all(ev["call_id"] == call_id for ev in failed)
    after = scrape(port)
    assert moved(before, after, "pcproxy_pool_unreachable_total{}") == 1
    assert moved(before, after, "pcproxy_failovers_total{}") == 1
    assert after["pcproxy_pool_targets_down{}"] == 2
    assert after["pcproxy_responses_total{code=503}"] >= 1


def test_readyz_and_options_say_503_while_a_drain_waits_for_an_unanswered_invite(
    observed: tuple[Daemon, int], pool_net: PoolNet
) -> None:
    daemon, port = observed
    silent = SilentMember(*pool_net.member("SLOW_SILENT_PORT"))
    sip = UdpClient(daemon)
    try:
        sip.send("INVITE", "sip:slowchat@%s" % DOMAIN, "z9hG4bK-slow1", "slow-1@test")
        assert sip.sock.recv(65535).startswith(b"SIP/2.0 100 ")
        daemon_waits(silent)
        assert scrape(port)["pcproxy_transactions_in_flight{}"] >= 1
        mark = daemon.mark()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for("draining", since=mark)

        assert get(port, "/readyz") == (503, b"draining\n")
        assert get(port, "/healthz") == (200, b"ok\n")
        samples = scrape(port)
        assert samples["pcproxy_draining{}"] == 1 and samples["pcproxy_ready{}"] == 0
        assert samples["pcproxy_transactions_in_flight{}"] >= 1
        sip.send("OPTIONS", "sip:127.0.0.1:%d" % daemon.port, "z9hG4bK-opt1", "opt-1@test")
        answer = sip.final()
        assert answer.startswith(b"SIP/2.0 503 "), answer
        assert re.search(rb"\r\nRetry-After: *\d+\r\n", answer)
        assert daemon.proc.poll() is None  # still draining
    finally:
        sip.close()
        silent.close()
    assert daemon.stop(signal.SIGTERM) == 0  # a second signal ends the drain at once
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # the log reader may still be at the last lines
        with daemon.lock:
            stopped = [ev for ev in daemon.events[mark:] if ev.get("event") == "stopped"]
        if stopped:
            break
        time.sleep(0.05)
    assert stopped and int(stopped[0]["in_flight"]) >= 1  # type: ignore[call-overload]


def daemon_waits(silent: SilentMember, timeout: float = 10.0) -> None:
    """Until the silent pool member has the INVITE: the daemon now waits on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with silent.lock:
            if b"INVITE sip:slowchat@" in silent.received:
                return
        time.sleep(0.05)
    raise AssertionError("the INVITE never reached the silent pool member")


def test_a_drain_lets_the_invite_in_flight_finish_then_exits_0(
    observed: tuple[Daemon, int], pool_net: PoolNet, tmp_path: Path
) -> None:
    """SIGTERM while the pool still rings: new requests get 503 and /readyz
    says draining, while the INVITE in flight gets the pool's 200; then, with
    no transaction left, the daemon exits 0 without a second signal.  (A
    drain waits for transactions, not for dialogs: a BYE sent after it ended
    finds no daemon.)"""
    daemon, port = observed
    pool = pool_member(pool_net, "SRV_PORT", "pool_slow_call.xml", tmp_path)
    caller = UdpClient(daemon)
    try:
        caller.send("INVITE", "sip:ocschat@%s" % DOMAIN, "z9hG4bK-ring1", "ring-1@test")
        deadline = time.monotonic() + 10.0
        while scrape(port)["pcproxy_transactions_in_flight{}"] < 1:
            assert time.monotonic() < deadline, "the INVITE never got in flight"
            time.sleep(0.05)
        mark = daemon.mark()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for("draining", since=mark)
        assert get(port, "/readyz") == (503, b"draining\n")
        late = UdpClient(daemon)
        try:
            late.send("INVITE", "sip:ocschat@%s" % DOMAIN, "z9hG4bK-late1", "late-1@test")
            refused = late.final()
            assert refused.startswith(b"SIP/2.0 503 "), refused
            late.ack("sip:ocschat@%s" % DOMAIN, "z9hG4bK-late1", "late-1@test", refused)
        finally:
            late.close()
        answer = caller.final()  # the pool's 200, two seconds after the 180
        assert answer.startswith(b"SIP/2.0 200 "), answer
    finally:
        caller.close()
    assert daemon.proc.wait(timeout=20) == 0
    pool.stop()  # its connection to pcproxy went with the daemon
