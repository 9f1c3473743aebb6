"""The RFC 3263 plan without a network: the pure ordering, and the cache,
serve-stale and failure memory over a scripted stand-in for dnspython."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from proxy.resolve import (
    DEFAULT_PORT,
    Hop,
    QueryRecord,
    ResolveError,
    Resolver,
    Target,
    address_text,
    demote_failed,
    is_address,
    order_hops,
    order_targets,
    srv_name,
    target_host,
    transports_for,
)
from proxy.sip.errors import SipError

POOL = "pool.contoso.com"


def srv(*records: str, ttl: int = 300) -> dns.rdataset.Rdataset:
    """An SRV rdataset from zone-file text, e.g. ``"10 60 5041 fe1.contoso.com."``."""
    return dns.rdataset.from_text("IN", "SRV", ttl, *records)


WEIGHTED = srv(
    "10 60 5041 fe1.contoso.com.",
    "10 30 5041 fe2.contoso.com.",
    "10 10 5041 fe3.contoso.com.",
    "20 0 5042 standby.contoso.com.",
)
ADDRESSES = {
    "fe1.contoso.com": ["192.0.2.31"],
    "fe2.contoso.com": ["192.0.2.32"],
    "fe3.contoso.com": ["192.0.2.33", "2001:db8::33"],
    "standby.contoso.com": ["192.0.2.39"],
    POOL: ["192.0.2.11", "192.0.2.12"],
}


# RFC 2782 order, by dnspython ------------------------------------------------------
def test_lower_priority_always_comes_first() -> None:
    for _ in range(200):
        hops = order_hops({"tls": WEIGHTED}, ("tls",))
        assert [h.host for h in hops][-1] == "standby.contoso.com"
        assert {h.host for h in hops[:3]} == {
            "fe1.contoso.com",
            "fe2.contoso.com",
            "fe3.contoso.com",
        }
        assert hops[-1] == Hop("standby.contoso.com", 5042, "tls")


def test_weights_decide_how_often_a_target_comes_first() -> None:
    runs = 4000
    first = Counter(order_hops({"tls": WEIGHTED}, ("tls",))[0].host for _ in range(runs))
    share = {host: n / runs for host, n in first.items()}
    assert share["fe1.contoso.com"] == pytest.approx(0.6, abs=0.05)
    assert share["fe2.contoso.com"] == pytest.approx(0.3, abs=0.05)
    assert share["fe3.contoso.com"] == pytest.approx(0.1, abs=0.04)
    assert "standby.contoso.com" not in share


def test_transports_in_preference_tls_tcp_udp() -> None:
    records = {
        "udp": srv("10 0 5060 u.contoso.com."),
        "tcp": srv("10 0 5060 t.contoso.com."),
        "tls": srv("10 0 5041 s.contoso.com."),
    }
    hops = order_hops(records, transports_for(None))
    assert [h.transport for h in hops] == ["tls", "tcp", "udp"]
    assert [h.transport for h in order_hops(records, transports_for("tcp"))] == ["tcp"]


def test_srv_target_dot_means_no_service_and_duplicates_collapse() -> None:
    assert order_hops({"tls": srv("0 0 0 .")}, ("tls",)) == []
    twice = srv("10 0 5041 fe1.contoso.com.", "20 0 5041 FE1.contoso.com.")
    assert order_hops({"tls": twice}, ("tls",)) == [Hop("fe1.contoso.com", 5041, "tls")]


# the whole plan, pure ------------------------------------------------------------------
def test_srv_plan_expands_each_target_to_its_addresses_a_before_aaaa() -> None:
    plan = order_targets(POOL, srv={"tls": srv("10 0 5041 fe3.contoso.com.")}, addresses=ADDRESSES)
    assert plan == [
        Target("fe3.contoso.com", "192.0.2.33", 5041, "tls"),
        Target("fe3.contoso.com", "2001:db8::33", 5041, "tls"),
    ]


def test_no_srv_falls_back_to_the_names_addresses_on_5041_over_tls() -> None:
    plan = order_targets(POOL, srv={"tls": None}, addresses=ADDRESSES)
    assert plan == [
        Target(POOL, "192.0.2.11", DEFAULT_PORT, "tls"),
        Target(POOL, "192.0.2.12", DEFAULT_PORT, "tls"),
    ]
    assert DEFAULT_PORT == 5041
    other = order_targets(
        POOL + ".", srv={}, addresses=ADDRESSES, default_port=5061, transport="tcp"
    )
    assert [(t.port, t.transport) for t in other] == [(5061, "tcp"), (5061, "tcp")]


def test_explicit_port_skips_srv() -> None:
    plan = order_targets(POOL, srv={"tls": WEIGHTED}, addresses=ADDRESSES, port=5070)
    assert plan == [
        Target(POOL, "192.0.2.11", 5070, "tls"),
        Target(POOL, "192.0.2.12", 5070, "tls"),
    ]
    tcp = order_targets(POOL, srv={}, addresses=ADDRESSES, port=5060, transport="tcp")
    assert {t.transport for t in tcp} == {"tcp"}


def test_numeric_host_is_its_own_target() -> None:
    assert order_targets("192.0.2.7", srv={}, addresses={}) == [
        Target("192.0.2.7", "192.0.2.7", 5041, "tls")
    ]
    assert order_targets("[2001:db8::7]", srv={}, addresses={}, port=5060, transport="tcp") == [
        Target("[2001:db8::7]", "2001:db8::7", 5060, "tcp")
    ]


def test_failed_targets_go_last_in_their_order_and_none_is_dropped() -> None:
    plan = order_targets(
        POOL,
        srv={},
        addresses={POOL: ["192.0.2.1", "192.0.2.2", "192.0.2.3"]},
        failed={("192.0.2.1", 5041, "tls"), ("192.0.2.2", 5041, "tls")},
    )
    assert [t.address for t in plan] == ["192.0.2.3", "192.0.2.1", "192.0.2.2"]
    assert demote_failed(plan, {t.key for t in plan}) == plan


def test_the_same_address_through_two_names_is_tried_once() -> None:
    records = {"tls": srv("10 0 5041 a.contoso.com.", "20 0 5041 b.contoso.com.")}
    plan = order_targets(
        POOL,
        srv=records,
        addresses={"a.contoso.com": ["192.0.2.5"], "b.contoso.com": ["192.0.2.5"]},
    )
    assert plan == [Target("a.contoso.com", "192.0.2.5", 5041, "tls")]


def test_unknown_transport_is_a_resolve_error_with_503() -> None:
    with pytest.raises(ResolveError) as info:
        transports_for("sctp")
    assert isinstance(info.value, SipError) and info.value.status == 503
    assert srv_name("Pool.Contoso.com.", "tls") == "_sips._tcp.pool.contoso.com"


# the Resolver over a scripted DNS ---------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedDns:
    """Stands in for ``dns.asyncresolver.Resolver``: answers from ``zone``
    (name -> type -> (ttl, records)), or raises ``down`` when set."""

    zone: dict[str, dict[str, tuple[int, list[str]]]]
    down: Exception | None = None
    queries: list[tuple[str, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def resolve(self, qname: dns.name.Name, rdtype: int, **kwargs: object) -> object:
        name = qname.to_text(omit_final_dot=True)
        text = dns.rdatatype.to_text(dns.rdatatype.RdataType(rdtype))
        self.queries.append((name, text))
        if self.gate is not None:
            await self.gate.wait()
        if self.down is not None:
            raise self.down
        if name not in self.zone:
            nx = {qname: nxdomain(qname)}
            raise dns.resolver.NXDOMAIN(qnames=[qname], responses=nx)  # type: ignore[no-untyped-call]
        ttl, records = self.zone[name].get(text, (60, []))
        rrset = dns.rrset.from_text_list(qname, ttl, "IN", text, records) if records else None
        return SimpleNamespace(rrset=rrset, chaining_result=SimpleNamespace(minimum_ttl=ttl))


def nxdomain(qname: dns.name.Name) -> dns.message.Message:
    """An NXDOMAIN response whose SOA (TTL 600, MINIMUM 45) gives 45 s."""
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    response.set_rcode(dns.rcode.NXDOMAIN)
    soa = response.find_rrset(
        response.authority,
        dns.name.from_text("contoso.com."),
        dns.rdataclass.IN,
        dns.rdatatype.SOA,
        create=True,
    )
    soa.add(
        dns.rdata.from_text("IN", "SOA", "ns.contoso.com. h.contoso.com. 1 3600 600 86400 45"), 600
    )
    return response


ZONE = {
    POOL: {"A": (30, ["192.0.2.11", "192.0.2.12"])},
    "_sips._tcp.srv.contoso.com": {"SRV": (300, ["10 0 5041 fe1.contoso.com."])},
    "fe1.contoso.com": {"A": (300, ["192.0.2.31"]), "AAAA": (300, ["2001:db8::31"])},
}


def resolver(**kwargs: object) -> tuple[Resolver, ScriptedDns, Clock]:
    clock = Clock()
    r = Resolver(nameservers=["127.0.0.1"], port=53, clock=clock, **kwargs)  # type: ignore[arg-type]
    scripted = ScriptedDns({k: dict(v) for k, v in ZONE.items()})
    r.dns_resolver = scripted  # type: ignore[assignment]
    return r, scripted, clock


@pytest.mark.asyncio
async def test_answers_are_cached_for_their_ttl() -> None:
    r, net, clock = resolver()
    first = await r.plan(POOL)
    asked = len(net.queries)
    assert await r.plan(POOL) == first
    assert len(net.queries) == asked
    clock.now += 31
    await r.plan(POOL)
    assert (POOL, "A") in net.queries[asked:]
    assert r.stats.hits > 0


@pytest.mark.asyncio
async def test_srv_answer_gives_targets_in_order() -> None:
    r, _, _ = resolver()
    assert [t.address for t in await r.plan("srv.contoso.com")] == ["192.0.2.31", "2001:db8::31"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "down",
    [
        dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]),  # type: ignore[no-untyped-call]
        dns.resolver.NoNameservers(),  # type: ignore[no-untyped-call]
    ],
    ids=["timeout", "no-nameserver"],
)
async def test_expired_answer_is_served_stale_when_the_dns_is_unreachable(
    down: Exception,
) -> None:
    r, net, clock = resolver(max_stale=3600, stale_recheck=30)
    warm = await r.plan(POOL)
    net.down = down
    clock.now += 100
    assert await r.plan(POOL) == warm
    assert r.stats.stale >= 1
    asked = len(net.queries)
    clock.now += 10  # within the failure recheck time: not asked again
    assert await r.plan(POOL) == warm
    assert len(net.queries) == asked
    clock.now += 3600  # past max stale
    with pytest.raises(ResolveError) as info:
        await r.plan(POOL)
    assert info.value.status == 503


@pytest.mark.asyncio
async def test_stale_answer_is_not_used_when_the_dns_says_the_name_is_gone() -> None:
    r, net, clock = resolver()
    await r.plan(POOL)
    del net.zone[POOL]
    clock.now += 31
    with pytest.raises(ResolveError) as info:
        await r.plan(POOL)
    assert "NXDOMAIN" in info.value.reason


@pytest.mark.asyncio
async def test_nxdomain_is_cached_for_the_soa_negative_ttl() -> None:
    r, net, clock = resolver()
    for _ in range(2):
        with pytest.raises(ResolveError):
            await r.plan("gone.contoso.com", port=5041)
    assert net.queries.count(("gone.contoso.com", "A")) == 1
    clock.now += 46
    with pytest.raises(ResolveError):
        await r.plan("gone.contoso.com", port=5041)
    assert net.queries.count(("gone.contoso.com", "A")) == 2


@pytest.mark.asyncio
async def test_unreachable_dns_without_cache_is_a_resolve_error_naming_the_cause() -> None:
    r, net, clock = resolver()
    net.down = dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])  # type: ignore[no-untyped-call]
    with pytest.raises(ResolveError) as info:
        await r.plan(POOL)
    assert "DNS timeout" in info.value.reason
    # RFC 9520 §3.2: the failure is remembered for failure_cache_ttl, not retried per request
    asked = len(net.queries)
    with pytest.raises(ResolveError) as again:
        await r.plan(POOL)
    assert "DNS timeout" in again.value.reason
    assert len(net.queries) == asked
    net.down = None
    clock.now += r.failure_cache_ttl + 0.1
    assert await r.plan(POOL)  # and forgotten after it: the DNS is asked again
    assert len(net.queries) > asked


@pytest.mark.asyncio
async def test_a_pool_with_a_records_only_is_planned_from_the_cache() -> None:
    r, net, _ = resolver()
    first = await r.plan(POOL, port=5041)
    asked = len(net.queries)
    assert r.plan_cached(POOL, port=5041) == first
    assert len(net.queries) == asked
    assert r.plan_cached("other.contoso.com", port=5041) is None


@pytest.mark.asyncio
async def test_cache_is_bounded_least_recently_used_goes_first() -> None:
    r, net, _ = resolver(cache_size=2)
    net.zone.update({"h%d.contoso.com" % i: {"A": (300, ["192.0.2.%d" % i])} for i in range(4)})
    for i in range(4):
        await r.lookup("h%d.contoso.com" % i, "A")
    assert r.cached() == 2 and r.stats.evictions == 2
    asked = len(net.queries)
    await r.lookup("h3.contoso.com", "A")
    assert len(net.queries) == asked
    await r.lookup("h0.contoso.com", "A")
    assert len(net.queries) == asked + 1


@pytest.mark.asyncio
async def test_concurrent_lookups_of_one_name_share_one_query() -> None:
    r, net, _ = resolver()
    net.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(r.lookup(POOL, "A")) for _ in range(5)]
    await asyncio.sleep(0)
    net.gate.set()
    results = await asyncio.gather(*tasks)
    assert net.queries == [(POOL, "A")]
    assert all(res.rdataset is results[0].rdataset for res in results)


@pytest.mark.asyncio
async def test_failed_target_goes_last_until_the_failure_is_forgotten() -> None:
    r, _, clock = resolver(failure_ttl=30)
    first = (await r.plan(POOL))[0]
    r.mark_failed(first)
    assert (await r.plan(POOL))[-1] == first
    clock.now += 31
    assert (await r.plan(POOL))[0] == first
    r.mark_failed(first)
    r.mark_succeeded(first)
    assert (await r.plan(POOL))[0] == first


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (dns.exception.Timeout(), "DNS timeout"),  # type: ignore[no-untyped-call]
        (dns.name.EmptyLabel(), "DNS error (EmptyLabel)"),  # type: ignore[no-untyped-call]
        (dns.resolver.NoAnswer(), "no records"),  # type: ignore[no-untyped-call]
    ],
)
async def test_dnspython_exceptions_become_one_reason(error: Exception, reason: str) -> None:
    r, net, _ = resolver()
    net.down = error
    with pytest.raises(ResolveError) as info:
        await r.plan(POOL, port=5041)
    assert reason in info.value.reason


@pytest.mark.asyncio
async def test_nxdomain_without_a_response_is_not_cached() -> None:
    r, net, _ = resolver()
    qname = dns.name.from_text(POOL)
    net.down = dns.resolver.NXDOMAIN(qnames=[qname], responses={})  # type: ignore[no-untyped-call]
    for _ in range(2):
        with pytest.raises(ResolveError):
            await r.plan(POOL, port=5041)
    assert net.queries.count((POOL, "A")) == 2


@pytest.mark.asyncio
async def test_all_srv_targets_dot_is_a_resolve_error() -> None:
    r, net, _ = resolver()
    net.zone["_sips._tcp.none.contoso.com"] = {"SRV": (300, ["0 0 0 ."])}
    with pytest.raises(ResolveError) as info:
        await r.plan("none.contoso.com")
    assert "no SRV target" in info.value.reason


# the query hook (pcproxy explain) -------------------------------------------------------
@pytest.mark.asyncio
async def test_on_query_reports_each_query_sent_in_order_and_no_cache_hit() -> None:
    seen: list[QueryRecord] = []
    r, net, _ = resolver(on_query=seen.append)
    targets = await r.plan("srv.contoso.com")
    assert targets == await r.plan("srv.contoso.com")  # the second plan is all cache hits
    seen.sort(key=lambda q: q.seq)
    assert [(q.seq, q.name, q.rdtype) for q in seen] == [
        (n, name, rdtype) for n, (name, rdtype) in enumerate(net.queries, 1)
    ]
    assert [(q.name, q.rdtype) for q in seen][:3] == [
        ("_sips._tcp.srv.contoso.com", "SRV"),
        ("_sip._tcp.srv.contoso.com", "SRV"),
        ("_sip._udp.srv.contoso.com", "SRV"),
    ]
    by_query = {(q.name, q.rdtype): q for q in seen}
    assert by_query[("_sip._tcp.srv.contoso.com", "SRV")].lookup.reason == "NXDOMAIN"
    assert by_query[("_sip._tcp.srv.contoso.com", "SRV")].cached_for == 45  # the SOA's MINIMUM
    found = by_query[("fe1.contoso.com", "A")]
    assert found.lookup.rdataset is not None and found.cached_for == 300


@pytest.mark.asyncio
async def test_without_on_query_the_plain_query_runs() -> None:
    r, _, _ = resolver()
    assert r.on_query is None
    called: list[str] = []

    async def traced(name: str, rdtype: str) -> object:
        called.append(name)
        raise AssertionError("traced path taken without a hook")

    r._traced_query = traced  # type: ignore[assignment, method-assign]
    assert [t.address for t in await r.plan("srv.contoso.com")] == ["192.0.2.31", "2001:db8::31"]
    assert called == []


@pytest.mark.asyncio
async def test_each_query_sent_is_counted_by_outcome_and_timed() -> None:
    r, net, clock = resolver()
    timed: list[tuple[str, float]] = []
    r.on_outcome = lambda outcome, seconds: timed.append((outcome, seconds))
    await r.plan(POOL, port=5041)  # A answered, AAAA has no records
    with pytest.raises(ResolveError):
        await r.plan("gone.contoso.com", port=5041)
    net.down = dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])  # type: ignore[no-untyped-call]
    with pytest.raises(ResolveError):
        await r.plan("other.contoso.com", port=5041)
    await r.plan(POOL, port=5041)  # from the cache: no query, not counted
    assert r.outcomes == {"answer": 1, "nodata": 1, "nxdomain": 2, "timeout": 2}
    assert sorted(o for o, _ in timed) == sorted(r.outcomes.elements())
    assert all(seconds == 0.0 for _, seconds in timed)  # the fake clock did not move


def test_record_texts_are_made_once_and_stay_right() -> None:
    """The texts remembered per record (``target_host``, ``address_text``)
    equal dnspython's, and a "." target stays "not available" (RFC 2782)."""
    records = srv("10 60 5041 FE1.Contoso.com.", "0 0 0 .")
    first, root = sorted(records, key=lambda r: r.priority, reverse=True)
    for _ in range(2):
        assert target_host(first) == "fe1.contoso.com"
        assert target_host(root) is None
    a = dns.rdataset.from_text("IN", "A", 300, "192.0.2.31", "192.0.2.32")
    assert [address_text(r) for r in a] * 2 == [r.to_text() for r in a] * 2
    assert [is_address(h) for h in ("192.0.2.1", "[2001:db8::1]", "pool.contoso.com")] == [
        True,
        True,
        False,
    ]


# plan_cached's memo ------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_plan_no_chance_orders_is_kept_until_its_answers_expire() -> None:
    r, net, clock = resolver()
    first = await r.plan("srv.contoso.com", transport="tls")
    hits = r.stats.hits
    assert r.plan_cached("srv.contoso.com", transport="tls") == first
    assert len(r._plans) == 1
    looked = r.stats.hits - hits
    assert looked == 3  # the SRV, A and AAAA answers it stands for
    r._cache.clear()  # only the memo can answer now
    again = r.plan_cached("srv.contoso.com", transport="tls")
    assert again == first and again is not r.plan_cached("srv.contoso.com", transport="tls")
    assert r.stats.hits - hits == 3 * looked  # counted as the cache hits it saves
    clock.now += 301  # the answers' TTL is over
    assert r.plan_cached("srv.contoso.com", transport="tls") is None


@pytest.mark.asyncio
async def test_a_plan_weights_order_is_drawn_again_every_time() -> None:
    r, net, _ = resolver()
    net.zone["_sips._tcp.w.contoso.com"] = {
        "SRV": (300, ["10 60 5041 fe1.contoso.com.", "10 40 5041 fe2.contoso.com."])
    }
    net.zone["fe2.contoso.com"] = {"A": (300, ["192.0.2.32"]), "AAAA": (300, [])}
    await r.plan("w.contoso.com", transport="tls")
    firsts = {r.plan_cached("w.contoso.com", transport="tls")[0].host for _ in range(200)}  # type: ignore[index]
    assert firsts == {"fe1.contoso.com", "fe2.contoso.com"}  # RFC 2782 §"Usage rules"
    assert not r._plans


@pytest.mark.asyncio
async def test_a_kept_plan_gives_way_to_a_new_answer_and_to_a_failed_target() -> None:
    from proxy import resolve

    r, net, clock = resolver()
    first = await r.plan(POOL, port=5041)
    assert r.plan_cached(POOL, port=5041) == first and r._plans
    r.mark_failed(first[0])  # RFC 3263 §4.3: tried last from now on
    assert r.plan_cached(POOL, port=5041) == [first[1], first[0]]
    r.mark_succeeded(first[0])
    assert r.plan_cached(POOL, port=5041) == first
    # an answer stored before the kept ones expire (a serve-stale recheck)
    a = dns.rdataset.from_text("IN", "A", 30, "192.0.2.14")
    r._store((POOL, "A"), resolve.Lookup(a), 30.0)
    assert [t.address for t in r.plan_cached(POOL, port=5041) or []] == ["192.0.2.14"]
    net.zone[POOL] = {"A": (30, ["192.0.2.13"])}
    clock.now += 31
    assert r.plan_cached(POOL, port=5041) is None  # expired: plan() asks the DNS
    assert [t.address for t in await r.plan(POOL, port=5041)] == ["192.0.2.13"]
    assert [t.address for t in r.plan_cached(POOL, port=5041) or []] == ["192.0.2.13"]


def test_the_plans_kept_are_bounded() -> None:
    from proxy import resolve

    r, _, clock = resolver()
    until = clock.now + 300.0
    for n in range(resolve.PLANS_MAX + 5):
        host = "h%d.contoso.com" % n
        a = dns.rdataset.from_text("IN", "A", 300, "192.0.2.%d" % (n % 250 + 1))
        r._cache[(host, "A")] = resolve._Entry(resolve.Lookup(a), until, until)
        r._cache[(host, "AAAA")] = resolve._Entry(resolve.Lookup(None), until, until)
        assert r.plan_cached(host, port=5060)
        assert len(r._plans) <= resolve.PLANS_MAX
    assert len(r._plans) == 5  # emptied once, when full, and kept since


@pytest.mark.asyncio
async def test_a_plan_without_srv_or_dns_at_all_is_kept_too() -> None:
    r, net, _ = resolver()
    first = await r.plan(POOL)  # no SRV records: the A records on the default port
    assert r.plan_cached(POOL) == first and r._plans
    asked = len(net.queries)
    assert r.plan_cached("192.0.2.7", port=5060) == [Target("192.0.2.7", "192.0.2.7", 5060, "tls")]
    assert len(r._plans) == 2 and len(net.queries) == asked  # an address asks nothing
