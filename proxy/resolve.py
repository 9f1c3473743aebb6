"""Where a Persistent Chat pool is: the RFC 3263 §4 target plan, over dnspython.

Theory of operation
-------------------
``Resolver.plan(fqdn, port=, transport=)`` answers "which (address, port,
transport) do I try, in which order" for a pool FQDN:

* a numeric address is its own target (RFC 3263 §4.2), on the port given or
  the default port;
* with an explicit port, the A/AAAA records of the name, on that port, over the
  transport given (TLS by default) — no SRV query (RFC 3263 §4.2);
* without one, SRV for the enabled transports, ``_sips._tcp`` (TLS),
  ``_sip._tcp`` (TCP), ``_sip._udp`` (UDP) in that preference, or only the one
  transport given (RFC 3263 §4.1, §4.2; NAPTR is not consulted: Lync publishes
  none for a pool, which RFC 3263 §4.1 treats as "no NAPTR records").  Each
  transport's records are put in RFC 2782 order — lowest priority first,
  weighted random within a priority — by dnspython's own
  ``Rdataset.processing_order()``, anew for every plan, and each target host is
  expanded to its A then AAAA addresses;
* when no SRV record exists (how a pool is documented: A records only), the
  A/AAAA records of the FQDN on the default port, 5041 over TLS (RFC 3263
  §4.2 "If no SRV records were found"; the port and transport are
  configurable).

Every address of every target is in the plan, so the caller can fail over
from one to the next (RFC 3263 §4.3); ``mark_failed(target)`` remembers a
target that did not answer for ``failure_ttl`` seconds, and later plans put it
last (never drop it: a pool whose every member failed is still tried).

The ordering is a pure function, ``order_targets``, of the answers; only the
queries await.  Answers are cached by (name, type) for their TTL (capped at
seven days, RFC 8767 §4), negative answers for the SOA's negative TTL (RFC
2308 §5), in an LRU of bounded size.  Expired entries are kept up to
``max_stale`` seconds and served only when a refresh cannot reach the DNS (a
timeout, or no nameserver answering) — RFC 8767 §5 — after which the name is
not asked again for ``stale_recheck`` seconds (RFC 8767's failure recheck
timer).  Concurrent lookups of one (name, type) share one query.

dnspython's typed exceptions become a reason string (``NXDOMAIN``, ``DNS
timeout``...); a ``ResolveError`` (503, the project's one error root) is raised
only when the plan would be empty.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataset
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.SRV import SRV

from proxy.sip.errors import SipError

if TYPE_CHECKING:
    from proxy.config import Settings

DEFAULT_PORT: Final = 5041
"""The Persistent Chat pool's SIP port (Lync default, TLS)."""
DEFAULT_TRANSPORT: Final = "tls"
SERVICES: Final[Mapping[str, str]] = {"tls": "_sips._tcp", "tcp": "_sip._tcp", "udp": "_sip._udp"}
"""RFC 3263 §4.1 service labels per transport, in order of preference."""
MAX_TTL: Final = 7 * 86400
"""RFC 8767 §4: a TTL above seven days is capped at seven days."""
ADDRESS_TYPES: Final = ("A", "AAAA")


class ResolveError(SipError):
    """No target at all could be found for a name: 503 (RFC 3261 §16.7 step 6,
    RFC 3263 §4.3: the request cannot be forwarded)."""

    status = 503


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send a request: ``host`` is the name it came from."""

    host: str
    address: str
    port: int
    transport: str

    @property
    def key(self) -> tuple[str, int, str]:
        """What failure memory remembers: the same address reached by two
        names is the same server."""
        return (self.address, self.port, self.transport)


@dataclass(frozen=True, slots=True)
class Hop:
    """A host, port and transport before its addresses are looked up."""

    host: str
    port: int
    transport: str


# the pure part -------------------------------------------------------------------
#: Plans ``Resolver.plan_cached`` keeps at most (emptied when full).
PLANS_MAX = 256


def normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()


@functools.lru_cache(maxsize=4096)
def is_address(host: str) -> bool:
    """An IPv4 or IPv6 literal (brackets allowed)?  Remembered per text: a
    pool's name is asked about on every call, and the answer for a name
    costs an exception."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


#: ``id(rdata) -> (rdata, text)``: the text of a record, made once.  The
#: rdata is kept in the value, so the id cannot be reused while it is here.
_texts: dict[int, tuple[object, str]] = {}
_TEXTS_MAX = 4096


def target_host(rdata: SRV) -> str | None:
    """The host an SRV record names, lower case without the final dot, or
    None for "." (RFC 2782: the service is decidedly not available).

    dnspython's ``Name.to_text()`` and comparisons cost microseconds, and
    every proxied call orders the same few records."""
    hit = _texts.get(id(rdata))
    if hit is not None and hit[0] is rdata:
        return hit[1] or None
    host = "" if rdata.target == dns.name.root else normalise(rdata.target.to_text())
    _remember_text(rdata, host)
    return host or None


def address_text(rdata: dns.rdata.Rdata) -> str:
    """An A or AAAA record's address as text, made once per record."""
    hit = _texts.get(id(rdata))
    if hit is not None and hit[0] is rdata:
        return hit[1]
    text = rdata.to_text()
    _remember_text(rdata, text)
    return text


def _remember_text(rdata: object, text: str) -> None:
    if len(_texts) >= _TEXTS_MAX:
        _texts.clear()
    _texts[id(rdata)] = (rdata, text)


def transports_for(transport: str | None) -> tuple[str, ...]:
    """The transports whose SRV records are asked for (RFC 3263 §4.1)."""
    if transport is None:
        return tuple(SERVICES)
    if transport not in SERVICES:
        raise ResolveError("unknown transport %r" % transport)
    return (transport,)


def srv_name(fqdn: str, transport: str) -> str:
    """``_sips._tcp.pool.contoso.com`` (RFC 3263 §4.2, RFC 2782)."""
    return "%s.%s" % (SERVICES[transport], normalise(fqdn))


def order_hops(
    srv: Mapping[str, dns.rdataset.Rdataset | None], transports: Sequence[str]
) -> list[Hop]:
    """SRV records in the order to try (RFC 2782 "Usage rules", RFC 3263 §4.2).

    Transports in the order given; within one transport, dnspython's
    ``processing_order()``: ascending priority, and within a priority a
    weighted random order (weight 0 gets a small chance).  A target of "."
    ("service decidedly not available", RFC 2782) is skipped.
    """
    hops: list[Hop] = []
    seen: set[Hop] = set()
    for transport in transports:
        rdataset = srv.get(transport)
        if not rdataset:
            continue
        for rdata in rdataset.processing_order():
            assert isinstance(rdata, SRV)
            host = target_host(rdata)
            if host is None:
                continue
            hop = Hop(host, rdata.port, transport)
            if hop not in seen:
                seen.add(hop)
                hops.append(hop)
    return hops


def _by_chance(rdataset: dns.rdataset.Rdataset | None) -> bool:
    """Whether RFC 2782's selection orders these SRV records by chance: two
    of them share a priority (their weights then draw the order)."""
    if not rdataset or len(rdataset) < 2:
        return False
    priorities = {rdata.priority for rdata in rdataset}
    return len(priorities) < len(rdataset)


def srv_hosts(srv: Mapping[str, dns.rdataset.Rdataset | None]) -> list[str]:
    """Every target host named by the SRV records, in no particular order."""
    hosts: dict[str, None] = {}
    for rdataset in srv.values():
        for rdata in rdataset or ():
            assert isinstance(rdata, SRV)
            host = target_host(rdata)
            if host is not None:
                hosts[host] = None
    return list(hosts)


def demote_failed(
    targets: Iterable[Target], failed: Collection[tuple[str, int, str]]
) -> list[Target]:
    """Targets that failed recently go last, in their order; none is dropped."""
    ordered = list(targets)
    return [t for t in ordered if t.key not in failed] + [t for t in ordered if t.key in failed]


def order_targets(
    fqdn: str,
    *,
    srv: Mapping[str, dns.rdataset.Rdataset | None],
    addresses: Mapping[str, Sequence[str]],
    port: int | None = None,
    transport: str | None = None,
    default_port: int = DEFAULT_PORT,
    default_transport: str = DEFAULT_TRANSPORT,
    failed: Collection[tuple[str, int, str]] = frozenset(),
) -> list[Target]:
    """The plan, given the DNS answers (RFC 3263 §4.1, §4.2; RFC 2782).

    ``srv`` maps a transport to its SRV rdataset (``None`` or absent: no SRV
    records); ``addresses`` maps each host (lower case, no final dot) to its
    addresses, A before AAAA.  With a ``port``, or for a numeric ``fqdn``, SRV
    is not consulted.  Without SRV, the FQDN's own addresses on
    ``default_port``.  Duplicate (address, port, transport) keep their first
    place; ``failed`` ones go last.
    """
    name = normalise(fqdn)
    if port is not None or is_address(name):
        hops = [Hop(name, port or default_port, transport or default_transport)]
    else:
        hops = order_hops(srv, transports_for(transport))
        if not any(srv.get(t) for t in transports_for(transport)):
            hops = [Hop(name, default_port, transport or default_transport)]
    targets: list[Target] = []
    seen: set[tuple[str, int, str]] = set()
    for hop in hops:
        found = [name.strip("[]")] if hop.host == name and is_address(name) else []
        for address in found or addresses.get(hop.host, ()):
            target = Target(hop.host, address, hop.port, hop.transport)
            if target.key not in seen:
                seen.add(target.key)
                targets.append(target)
    return demote_failed(targets, failed)


# the cache ------------------------------------------------------------------------
@dataclass(slots=True)
class Lookup:
    """One (name, type) answer: the records, or why there are none."""

    rdataset: dns.rdataset.Rdataset | None
    reason: str | None = None
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class QueryRecord:
    """One DNS query a ``Resolver`` sent and what came of it, for
    ``Resolver.on_query`` (``pcproxy explain``): never made for cache hits.

    ``seq`` numbers the queries in the order they were sent; ``cached_for``
    is how long the answer (or the failure) is kept, in seconds.
    """

    seq: int
    name: str
    rdtype: str
    lookup: Lookup
    cached_for: float
    elapsed: float


@dataclass(slots=True)
class _Entry:
    lookup: Lookup
    expires: float
    stale_until: float
    recheck_after: float = 0.0


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0


#: How a query sent to the DNS ended, by the reason ``_reason`` gives.
OUTCOMES: Final[Mapping[str | None, str]] = {
    None: "answer",
    "NXDOMAIN": "nxdomain",
    "no records": "nodata",
    "DNS timeout": "timeout",
    "no nameserver answered": "no_nameserver",
}


def outcome_of(lookup: Lookup) -> str:
    """``answer``, ``nxdomain``, ``nodata``, ``timeout``, ``no_nameserver``
    or ``error``: the label a query is counted under."""
    return OUTCOMES.get(lookup.reason, "error")


def _reason(exc: dns.exception.DNSException) -> tuple[str, bool]:
    """A dnspython exception as (reason, the DNS could not be reached)."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN", False
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no records", False
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return "DNS timeout", True
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver answered", True
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout", True
    return "DNS error (%s)" % type(exc).__name__, False


@dataclass
class Resolver:
    """RFC 3263 target plans with a TTL cache, serve-stale and failure memory.

    ``nameservers`` and ``port`` point the owned ``dns.asyncresolver.Resolver``
    at given servers (tests: ``["127.0.0.1"]`` and a port chosen at run time);
    without them /etc/resolv.conf is read.
    """

    nameservers: Sequence[str] | None = None
    port: int | None = None
    #: (address, port) of each DNS server, when they differ in port.
    endpoints: Sequence[tuple[str, int]] | None = None
    timeout: float = 2.0
    lifetime: float = 4.0
    default_port: int = DEFAULT_PORT
    default_transport: str = DEFAULT_TRANSPORT
    address_types: Sequence[str] = ADDRESS_TYPES
    cache_size: int = 1024
    max_stale: float = 86400.0
    stale_recheck: float = 30.0
    max_negative_ttl: float = 300.0
    #: A "no records" answer that carries no SOA (so no negative TTL, RFC 2308
    #: §5) is kept this long anyway: a pool with A records only would
    #: otherwise send one AAAA query per proxied request.
    min_negative_ttl: float = 5.0
    #: RFC 9520 §3.2: a lookup that failed (timeout, SERVFAIL, REFUSED) with
    #: nothing cached is remembered this long (at least 1 s, at most 5 min),
    #: so a failing DNS is not asked again by every request.
    failure_cache_ttl: float = 5.0
    failure_ttl: float = 30.0
    clock: Callable[[], float] = time.monotonic
    #: Called with every query sent to the DNS (``pcproxy explain`` records
    #: the steps of a plan this way); ``None``, the daemon's case, costs nothing.
    on_query: Callable[[QueryRecord], None] | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    #: Queries sent to the DNS, by ``outcome_of`` their answer.
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Called with (outcome, seconds) after every query sent to the DNS
    #: (the metrics' latency histogram).
    on_outcome: Callable[[str, float], object] | None = None
    dns_resolver: dns.asyncresolver.Resolver = field(init=False)
    _cache: OrderedDict[tuple[str, str], _Entry] = field(init=False, default_factory=OrderedDict)
    _failed: dict[tuple[str, int, str], float] = field(init=False, default_factory=dict)
    #: (fqdn, port, transport) -> a plan ``plan_cached`` worked out that no
    #: chance ordered (RFC 2782: one SRV record per priority), when it
    #: expires and how many cache hits it stands for; emptied by every new
    #: answer, and not used while a target is marked failed.
    _plans: dict[tuple[str, int | None, str | None], tuple[list[Target], float, int]] = field(
        init=False, default_factory=dict
    )
    _inflight: dict[tuple[str, str], asyncio.Future[Lookup]] = field(
        init=False, default_factory=dict
    )
    _sent: int = field(init=False, default=0)

    @classmethod
    def from_settings(
        cls, settings: Settings, on_query: Callable[[QueryRecord], None] | None = None
    ) -> Resolver:
        """The resolver ``[dns]`` and ``[proxy]`` describe: the daemon's, and
        ``pcproxy explain``'s (which passes ``on_query`` to record each step)."""
        dns_, proxy = settings.dns, settings.proxy
        return cls(
            endpoints=dns_.endpoints() or None,
            timeout=dns_.timeout,
            lifetime=dns_.lifetime,
            cache_size=dns_.cache_size,
            max_stale=dns_.max_stale,
            default_port=proxy.default_port,
            default_transport=proxy.default_transport,
            failure_ttl=proxy.failure_ttl,
            on_query=on_query,
        )

    def __post_init__(self) -> None:
        configure = self.nameservers is None and not self.endpoints
        resolver = dns.asyncresolver.Resolver(configure=configure)
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
        if self.endpoints:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in self.endpoints
            ]
        if self.port is not None:
            resolver.port = self.port
        resolver.timeout = self.timeout
        resolver.lifetime = self.lifetime
        resolver.cache = None
        self.dns_resolver = resolver

    # failure memory
    def mark_failed(self, target: Target) -> None:
        """Remember that ``target`` did not answer (RFC 3263 §4.3): later plans
        try it last, for ``failure_ttl`` seconds."""
        self._failed[target.key] = self.clock() + self.failure_ttl

    def mark_succeeded(self, target: Target) -> None:
        self._failed.pop(target.key, None)

    def failed(self) -> frozenset[tuple[str, int, str]]:
        now = self.clock()
        for key in [k for k, until in self._failed.items() if until <= now]:
            del self._failed[key]
        return frozenset(self._failed)

    # the plan
    async def plan(
        self, fqdn: str, *, port: int | None = None, transport: str | None = None
    ) -> list[Target]:
        """The targets for a pool, in the order to try (RFC 3263 §4).

        Raises ``ResolveError`` (503) only when there is no target at all.
        """
        name = normalise(fqdn)
        transports = transports_for(transport)
        srv: dict[str, dns.rdataset.Rdataset | None] = {}
        hosts = [name]
        if port is None and not is_address(name):
            answers = await asyncio.gather(
                *(self.lookup(srv_name(name, t), "SRV") for t in transports)
            )
            srv = {t: a.rdataset for t, a in zip(transports, answers, strict=True)}
            if any(srv.values()):
                hosts = srv_hosts(srv)
        addresses: dict[str, list[str]] = {}
        reasons: dict[str, None] = {}
        if not is_address(name):
            found = await asyncio.gather(*(self.addresses(h) for h in hosts))
            for host, (addrs, why) in zip(hosts, found, strict=True):
                addresses[host] = addrs
                for reason in why:
                    reasons["%s: %s" % (host, reason)] = None
        targets = self._order(name, srv, addresses, port, transport)
        if not targets:
            if not reasons:
                reasons["%s: no SRV target available" % name] = None
            raise ResolveError("; ".join(reasons))
        return targets

    def plan_cached(
        self, fqdn: str, *, port: int | None = None, transport: str | None = None
    ) -> list[Target] | None:
        """``plan()`` from fresh cache entries alone, without awaiting: the
        common case of a busy pool.  ``None`` when a query (or a stale
        answer) is needed, or when the plan would be empty; ``plan()`` then
        does the work and says why."""
        memo = (fqdn, port, transport)
        known = self._plans.get(memo)
        now = self.clock()
        if known is not None and not self._failed and now < known[1]:
            self.stats.hits += known[2]
            return list(known[0])
        name = normalise(fqdn)
        transports = transports_for(transport)
        srv: dict[str, dns.rdataset.Rdataset | None] = {}
        hosts = [name]
        numeric = is_address(name)
        expires = math.inf
        lookups = 0
        if port is None and not numeric:
            for t in transports:
                entry = self._fresh_entry(srv_name(name, t), "SRV", now)
                if entry is None:
                    return None
                srv[t] = entry.lookup.rdataset
                expires = min(expires, entry.expires)
                lookups += 1
            if any(srv.values()):
                hosts = srv_hosts(srv)
        addresses: dict[str, list[str]] = {}
        if not numeric:
            for host in hosts:
                found: list[str] = []
                for rdtype in self.address_types:
                    entry = self._fresh_entry(host, rdtype, now)
                    if entry is None:
                        return None
                    rdataset = entry.lookup.rdataset
                    if rdataset:
                        found += [address_text(r) for r in rdataset]
                    expires = min(expires, entry.expires)
                    lookups += 1
                addresses[host] = found
        plan = self._order(name, srv, addresses, port, transport)
        if plan and not self._failed and not any(map(_by_chance, srv.values())):
            if len(self._plans) >= PLANS_MAX:
                self._plans.clear()
            self._plans[memo] = (plan, expires, lookups)
            plan = list(plan)
        return plan or None

    def _order(
        self,
        name: str,
        srv: Mapping[str, dns.rdataset.Rdataset | None],
        addresses: Mapping[str, Sequence[str]],
        port: int | None,
        transport: str | None,
    ) -> list[Target]:
        return order_targets(
            name,
            srv=srv,
            addresses=addresses,
            port=port,
            transport=transport,
            default_port=self.default_port,
            default_transport=self.default_transport,
            failed=self.failed() if self._failed else frozenset(),
        )

    def _fresh(self, name: str, rdtype: str) -> Lookup | None:
        entry = self._fresh_entry(name, rdtype, self.clock())
        return None if entry is None else entry.lookup

    def _fresh_entry(self, name: str, rdtype: str, now: float) -> _Entry | None:
        entry = self._cache.get((name, rdtype))
        if entry is None or now >= entry.expires:
            return None
        self.stats.hits += 1
        return entry

    async def addresses(self, host: str) -> tuple[list[str], list[str]]:
        """The addresses of ``host``, A before AAAA, and why any type had none."""
        lookups = await asyncio.gather(*(self.lookup(host, t) for t in self.address_types))
        found: list[str] = []
        reasons: list[str] = []
        for rdtype, result in zip(self.address_types, lookups, strict=True):
            if result.rdataset:
                found += [r.to_text() for r in result.rdataset]
            elif result.reason:
                reasons.append("%s %s" % (rdtype, result.reason))
        return found, ([] if found else reasons)

    # the cache
    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """One (name, type) from the cache, the DNS, or the stale cache."""
        key = (normalise(name), rdtype)
        now = self.clock()
        entry = self._cache.get(key)
        if entry is not None:
            if now >= entry.stale_until:
                del self._cache[key]
                entry = None
            else:
                self._cache.move_to_end(key)
                if now < entry.expires:
                    self.stats.hits += 1
                    return entry.lookup
                if now < entry.recheck_after:
                    self.stats.stale += 1
                    return entry.lookup
        self.stats.misses += 1
        pending = self._inflight.get(key)
        if pending is None:
            query = self._query if self.on_query is None else self._traced_query
            pending = asyncio.ensure_future(query(*key))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        result = await asyncio.shield(pending)
        if result.unreachable:
            entry = self._cache.get(key)
            if entry is not None and self.clock() < entry.stale_until:
                entry.recheck_after = self.clock() + self.stale_recheck
                self.stats.stale += 1
                return entry.lookup
        return result

    async def _traced_query(self, name: str, rdtype: str) -> Lookup:
        """``_query``, reported to ``on_query`` with its order, time and cache life."""
        self._sent += 1
        seq = self._sent
        started = time.monotonic()
        lookup = await self._query(name, rdtype)
        elapsed = time.monotonic() - started
        entry = self._cache.get((name, rdtype))
        cached_for = max(entry.expires - self.clock(), 0.0) if entry is not None else 0.0
        if self.on_query is not None:
            self.on_query(QueryRecord(seq, name, rdtype, lookup, cached_for, elapsed))
        return lookup

    async def _query(self, name: str, rdtype: str) -> Lookup:
        """One question to the DNS, counted by outcome and timed."""
        started = self.clock()
        lookup = await self._ask(name, rdtype)
        outcome = outcome_of(lookup)
        self.outcomes[outcome] += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome, self.clock() - started)
        return lookup

    async def _ask(self, name: str, rdtype: str) -> Lookup:
        try:
            answer = await self.dns_resolver.resolve(
                dns.name.from_text(name),
                dns.rdatatype.from_text(rdtype),
                raise_on_no_answer=False,
                search=False,
            )
        except dns.resolver.NXDOMAIN as exc:
            lookup = Lookup(None, "NXDOMAIN")
            self._store((name, rdtype), lookup, self._negative_ttl(exc))
            return lookup
        except dns.exception.DNSException as exc:
            reason, unreachable = _reason(exc)
            lookup = Lookup(None, reason, unreachable)
            if (name, rdtype) not in self._cache:  # RFC 9520 §3.2: remember the failure
                self._store((name, rdtype), lookup, self.failure_cache_ttl, stale=False)
            return lookup
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            lookup = Lookup(None, "no records")
            negative = max(ttl, self.min_negative_ttl)
            self._store((name, rdtype), lookup, min(negative, self.max_negative_ttl))
        else:
            lookup = Lookup(answer.rrset)
            self._store((name, rdtype), lookup, min(ttl, MAX_TTL))
        return lookup

    def _negative_ttl(self, exc: dns.resolver.NXDOMAIN) -> float:
        """RFC 2308 §5: the SOA's TTL and MINIMUM bound a negative answer."""
        try:
            responses: dict[dns.name.Name, dns.message.QueryMessage] = exc.kwargs["responses"]
            response = next(iter(responses.values()))
            ttl = float(response.resolve_chaining().minimum_ttl)
        except (KeyError, StopIteration, dns.exception.DNSException):
            ttl = 0.0
        return min(ttl, self.max_negative_ttl)

    def _store(
        self, key: tuple[str, str], lookup: Lookup, ttl: float, *, stale: bool = True
    ) -> None:
        now = self.clock()
        until = now + ttl + (self.max_stale if stale else 0.0)
        self._plans.clear()  # a plan may have been worked out from the old answer
        self._cache[key] = _Entry(lookup, now + ttl, until)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
            self.stats.evictions += 1

    def cached(self) -> int:
        return len(self._cache)


async def plan(
    fqdn: str, *, port: int | None = None, transport: str | None = None, resolver: Resolver
) -> list[Target]:
    """``resolver.plan(...)``: the RFC 3263 §4 plan for a pool FQDN."""
    return await resolver.plan(fqdn, port=port, transport=transport)
