"""``pcproxy explain`` against a real DNS server (NSD) and a real pool member (SIPp).

The zone (dns/explain.zone.in) publishes an SRV pool and an A-record-only
pool; one member, SIPp on 127.0.0.2, answers OPTIONS; nothing listens on
127.0.0.3, so that member is down (UDP: ICMP port unreachable).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.tlspeer import answer_once_over_tls

from .conftest import SippPeer, cli, free_port, start_sipp
from .nsd import DnsServer, render_zone, start_nsd

pytestmark = pytest.mark.integration

UP, DOWN = "127.0.0.2", "127.0.0.3"


@dataclass
class Pool:
    dns: DnsServer
    up_port: int
    down_port: int
    db: Path


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    up_port, down_port = free_port(UP), free_port(DOWN)
    zonedir = tmp_path / "zone"
    render_zone("explain.zone.in", zonedir, {"UP_PORT": up_port, "DOWN_PORT": down_port})
    server = start_nsd(tmp_path / "nsd", zonedir)
    db = tmp_path / "table.db"
    for args in (
        ["--sip-address", "sip:ocschat@contoso.com", "--pool-fqdn", "pool-srv.pcproxy.test"],
        [
            "--sip-address",
            "sip:chat-a@contoso.com",
            "--pool-fqdn",
            "pool-a.pcproxy.test",
            "--pool-port",
            str(up_port),
            "--pool-transport",
            "udp",
            "--mode",
            "redirect",
        ],
        ["--sip-address", "sip:chat-fallback@contoso.com", "--pool-fqdn", "pool-a.pcproxy.test"],
    ):
        created = cli("endpoint", "new", *args, db=db)
        assert created.returncode == 0, created.stderr
    yield Pool(server, up_port, down_port, db)
    server.stop()


@pytest.fixture
def member(tmp_path: Path, pool: Pool) -> Iterator[SippPeer]:
    """SIPp on 127.0.0.2 answering one OPTIONS over UDP."""
    peer = start_sipp(
        "options_uas.xml", tmp_path, "member", host=UP, port=pool.up_port, transport="udp"
    )
    yield peer
    peer.stop()


def explain(pool: Pool, uri: str, *args: str) -> tuple[int, dict[str, Any]]:
    done = cli(
        "explain",
        uri,
        "--nameserver",
        pool.dns.nameserver,
        "--timeout",
        "1",
        "--json",
        *args,
        db=pool.db,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def steps(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["type"], s["name"], s["outcome"]) for s in report["dns"]]


def test_srv_pool_shows_each_query_the_order_and_which_member_is_up(
    pool: Pool, member: SippPeer
) -> None:
    code, report = explain(pool, "sip:OCSChat@Contoso.COM;transport=tcp")
    assert code == 0
    assert report["endpoint"]["sip_address"] == "sip:ocschat@contoso.com"
    assert report["mode"] == "proxy" and "inherits" in report["mode_reason"]
    found = steps(report)
    assert found[:3] == [
        ("SRV", "_sips._tcp.pool-srv.pcproxy.test", "NXDOMAIN"),
        ("SRV", "_sip._tcp.pool-srv.pcproxy.test", "NXDOMAIN"),
        ("SRV", "_sip._udp.pool-srv.pcproxy.test", "answer"),
    ]
    assert sorted(found[3:]) == [  # each SRV target's A and AAAA, asked together
        ("A", "fe1.pool-srv.pcproxy.test", "answer"),
        ("A", "fe2.pool-srv.pcproxy.test", "answer"),
        ("AAAA", "fe1.pool-srv.pcproxy.test", "NODATA"),
        ("AAAA", "fe2.pool-srv.pcproxy.test", "NODATA"),
    ]
    srv = report["dns"][2]
    assert srv["ttl"] == 300
    assert srv["records"] == [
        "10 60 %d fe1.pool-srv.pcproxy.test." % pool.up_port,
        "10 40 %d fe2.pool-srv.pcproxy.test." % pool.down_port,
    ]
    by_address = {t["address"]: t for t in report["targets"]}
    assert set(by_address) == {UP, DOWN}
    assert {t["transport"] for t in report["targets"]} == {"udp"}
    up, down = by_address[UP], by_address[DOWN]
    assert (up["port"], up["health"]["state"], up["health"]["status"]) == (pool.up_port, "up", 200)
    assert up["health"]["rtt_ms"] is not None
    assert (down["port"], down["health"]["state"]) == (pool.down_port, "down")
    assert down["health"]["error"] == "connection refused"
    assert any("weighted random order (RFC 2782)" in note for note in report["notes"])
    assert member.wait(10).returncode == 0


def test_a_record_pool_with_a_port_asks_no_srv_and_probes_every_address(
    pool: Pool, member: SippPeer
) -> None:
    code, report = explain(pool, "sip:chat-a@contoso.com")
    assert code == 0
    assert report["mode"] == "redirect" and report["mode_reason"] == (
        "the endpoint sets mode redirect"
    )
    assert report["answer"] == (
        "302 Moved Temporarily, Contact: <sip:chat-a@pool-a.pcproxy.test:%d;transport=udp>"
        % pool.up_port
    )
    assert steps(report) == [
        ("A", "pool-a.pcproxy.test", "answer"),
        ("AAAA", "pool-a.pcproxy.test", "NODATA"),
    ]
    assert sorted(report["dns"][0]["records"]) == [UP, DOWN]
    health = {t["address"]: t["health"]["state"] for t in report["targets"]}
    assert health == {UP: "up", DOWN: "down"}
    assert {(t["port"], t["transport"]) for t in report["targets"]} == {(pool.up_port, "udp")}
    assert member.wait(10).returncode == 0


def test_a_record_pool_without_a_port_falls_back_to_5041_over_tls(pool: Pool) -> None:
    code, report = explain(pool, "sip:chat-fallback@contoso.com", "--no-probe")
    assert code == 0
    assert steps(report) == [
        ("SRV", "_sips._tcp.pool-a.pcproxy.test", "NXDOMAIN"),
        ("SRV", "_sip._tcp.pool-a.pcproxy.test", "NXDOMAIN"),
        ("SRV", "_sip._udp.pool-a.pcproxy.test", "NXDOMAIN"),
        ("A", "pool-a.pcproxy.test", "answer"),
        ("AAAA", "pool-a.pcproxy.test", "NODATA"),
    ]
    assert {(t["address"], t["port"], t["transport"]) for t in report["targets"]} == {
        (UP, 5041, "tls"),
        (DOWN, 5041, "tls"),
    }
    assert all(t["health"] is None for t in report["targets"])


def test_unknown_uri_says_404_and_exits_1(pool: Pool) -> None:
    code, report = explain(pool, "sip:nobody@contoso.com")
    assert code == 1
    assert report["found"] is False and report["endpoint"] is None
    assert report["answer"].startswith("404 Not Found, ms-diagnostics 52001")
    assert report["dns"] == [] and report["targets"] == []


def test_text_output_names_the_steps_and_the_health(pool: Pool, member: SippPeer) -> None:
    done = cli(
        "explain",
        "sip:chat-a@contoso.com",
        "--nameserver",
        pool.dns.nameserver,
        "--timeout",
        "1",
        db=pool.db,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "endpoint  sip:chat-a@contoso.com (key chat-a@contoso.com)" in text
    assert "1. A    pool-a.pcproxy.test  TTL 300" in text
    assert "2. AAAA pool-a.pcproxy.test  NODATA" in text
    lines = {line.split()[1]: line for line in text.splitlines() if "/udp" in line}
    assert "up   200 OK" in lines["%s:%d/udp" % (UP, pool.up_port)]
    assert "down connection refused" in lines["%s:%d/udp" % (DOWN, pool.up_port)]


# TLS targets: probed with the [tls] client context ------------------------------------------
TLS_POOL = "pool-tls.pcproxy.test"  # 127.0.0.1 in the static zone (dns/pcproxy.test.zone)


@pytest.mark.parametrize("pool_name", [TLS_POOL, "other.contoso.com"], ids=["right", "wrong"])
def test_tls_target_is_probed_with_the_tls_client_context(tmp_path: Path, pool_name: str) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ours = ca.issue_cert("pcproxy.contoso.com")
    ours.cert_chain_pems[0].write_to_path(str(tmp_path / "pcproxy.crt"))
    ours.private_key_pem.write_to_path(str(tmp_path / "pcproxy.key"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(pool_name).configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    config = tmp_path / "pcproxy.toml"
    config.write_text(
        "[tls]\ncertificate = '%s'\nprivate_key = '%s'\nca_bundle = '%s'\n"
        % (tmp_path / "pcproxy.crt", tmp_path / "pcproxy.key", tmp_path / "ca.pem")
    )
    listener, thread = answer_once_over_tls(server, timeout=10)
    dns = start_nsd(tmp_path / "nsd")
    try:
        port = listener.getsockname()[1]
        db = tmp_path / "table.db"
        created = cli(
            "endpoint", "new", "--sip-address", "sip:ocschat@contoso.com", "--pool-fqdn",
            TLS_POOL, "--pool-port", str(port), "--pool-transport", "tls", db=db,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        done = cli(
            "explain", "sip:ocschat@contoso.com", "--config", str(config), "--nameserver",
            dns.nameserver, "--timeout", "2", "--json", db=db,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [target] = json.loads(done.stdout)["targets"]
        assert (target["address"], target["port"], target["transport"]) == (
            "127.0.0.1",
            port,
            "tls",
        )
        if pool_name == TLS_POOL:
            assert (target["health"]["state"], target["health"]["status"]) == ("up", 200)
        else:  # RFC 5922 §7.3: the certificate must name the pool
            assert target["health"]["state"] == "down"
            assert "CERTIFICATE_VERIFY_FAILED" in target["health"]["error"]
    finally:
        dns.stop()
        thread.join(10)
        listener.close()
