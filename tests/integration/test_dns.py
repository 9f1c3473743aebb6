"""The RFC 3263 plan against a real DNS server: NSD serving tests/integration/dns/.

NSD (Debian ``nsd``, installed by scripts/test) is an authoritative server
that reads a real zone file, so the SRV, A and AAAA records the tests resolve
are written the way an operator writes them.  Each server listens on
127.0.0.1 and a port chosen at run time, and is stopped by its PID.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.resolve import ResolveError, Resolver, Target, plan

from .nsd import DnsServer, start_nsd

pytestmark = pytest.mark.integration

SRV_POOL = "pool-srv.pcproxy.test"
A_POOL = "pool-a.pcproxy.test"


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = start_nsd(tmp_path_factory.mktemp("nsd"))
    yield server
    server.stop()


@pytest.fixture
def own_nsd(tmp_path: Path) -> Iterator[DnsServer]:
    """A server of the test's own, for tests that stop it."""
    server = start_nsd(tmp_path / "nsd")
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def resolver_for(server: DnsServer, **kwargs: object) -> Resolver:
    return Resolver(
        nameservers=["127.0.0.1"],
        port=server.port,
        timeout=0.5,
        lifetime=1.0,
        **kwargs,  # type: ignore[arg-type]
    )


# RFC 2782 order ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_srv_plan_orders_by_priority_and_weight(nsd: DnsServer) -> None:
    resolver = resolver_for(nsd)
    runs = 3000
    first: Counter[str] = Counter()
    for _ in range(runs):
        targets = await resolver.plan(SRV_POOL)
        keys = [(t.address, t.port, t.transport) for t in targets]
        assert set(keys[:4]) == {
            ("192.0.2.31", 5041, "tls"),
            ("192.0.2.32", 5041, "tls"),
            ("192.0.2.33", 5041, "tls"),
            ("2001:db8::33", 5041, "tls"),
        }
        assert keys[4:] == [("192.0.2.39", 5042, "tls"), ("192.0.2.31", 5060, "tcp")]
        fe3 = keys.index(("192.0.2.33", 5041, "tls"))
        assert keys[fe3 + 1] == ("2001:db8::33", 5041, "tls")
        first[targets[0].host] += 1
    share = {host: n / runs for host, n in first.items()}
    assert share["fe1.pool-srv.pcproxy.test"] == pytest.approx(0.6, abs=0.05)
    assert share["fe2.pool-srv.pcproxy.test"] == pytest.approx(0.3, abs=0.05)
    assert share["fe3.pool-srv.pcproxy.test"] == pytest.approx(0.1, abs=0.04)
    assert resolver.stats.misses <= 12  # the rest came from the cache


@pytest.mark.asyncio
async def test_transport_given_asks_only_its_srv(nsd: DnsServer) -> None:
    targets = await resolver_for(nsd).plan(SRV_POOL, transport="tcp")
    assert targets == [Target("fe1.pool-srv.pcproxy.test", "192.0.2.31", 5060, "tcp")]


# no SRV, explicit port, AAAA --------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_only_pool_falls_back_to_5041_over_tls(nsd: DnsServer) -> None:
    targets = await plan(A_POOL, resolver=resolver_for(nsd))
    assert sorted(t.address for t in targets) == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
    assert {(t.host, t.port, t.transport) for t in targets} == {(A_POOL, 5041, "tls")}


@pytest.mark.asyncio
async def test_aaaa_addresses_follow_the_a_addresses(nsd: DnsServer) -> None:
    targets = await resolver_for(nsd).plan("pool-v6.pcproxy.test")
    assert [t.address for t in targets][0] == "192.0.2.21"
    assert sorted(t.address for t in targets[1:]) == ["2001:db8::21", "2001:db8::22"]
    assert {t.port for t in targets} == {5041}


@pytest.mark.asyncio
async def test_explicit_port_skips_srv(nsd: DnsServer) -> None:
    resolver = resolver_for(nsd)
    targets = await resolver.plan(SRV_POOL, port=5061, transport="tcp")
    assert targets == [Target(SRV_POOL, "192.0.2.30", 5061, "tcp")]
    assert resolver.stats.misses == 2  # A and AAAA of the name, no SRV


@pytest.mark.asyncio
async def test_nxdomain_is_a_resolve_error(nsd: DnsServer) -> None:
    with pytest.raises(ResolveError) as info:
        await resolver_for(nsd).plan("nosuch.pcproxy.test")
    assert info.value.status == 503
    assert "NXDOMAIN" in info.value.reason and "nosuch.pcproxy.test" in info.value.reason


# failure memory ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_failed_target_moves_to_the_end(nsd: DnsServer) -> None:
    resolver = resolver_for(nsd)
    before = await resolver.plan(A_POOL)
    resolver.mark_failed(before[0])
    after = await resolver.plan(A_POOL)
    assert after == [*before[1:], before[0]]


# cache and serve-stale ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_warm_cache_answers_after_the_server_stops_fresh_then_stale(
    own_nsd: DnsServer,
) -> None:
    clock = Clock()
    resolver = resolver_for(own_nsd, clock=clock, max_stale=3600)
    warm_pool = await resolver.plan(A_POOL)
    warm_short = await resolver.plan("short.pcproxy.test", port=5041)
    asked = resolver.stats.misses
    own_nsd.stop()

    assert await resolver.plan(A_POOL) == warm_pool  # within its TTL of 300 s
    assert resolver.stats.misses == asked

    clock.now += 5  # "short" (TTL 1) has expired; the server cannot be reached
    assert await resolver.plan("short.pcproxy.test", port=5041) == warm_short
    assert resolver.stats.stale >= 1

    with pytest.raises(ResolveError) as info:
        await resolver.plan("pool-v6.pcproxy.test")  # never cached
    assert info.value.status == 503
    assert "no nameserver answered" in info.value.reason or "timeout" in info.value.reason
