"""``pcproxy explain``: what the daemon would do with a request for a URI, and why.

Theory of operation.  Nothing here decides anything of its own: the endpoint
is found by ``proxy.routing.decide`` on a snapshot of the table (the
Request-URI's ``user@host``, RFC 3261 §19.1.4 comparison: escapes decoded,
user case-folded, host lower-cased, port and parameters ignored), and the
targets come from ``proxy.resolve.Resolver.plan`` (RFC 3263 §4, RFC 2782
order), the daemon's own code, with ``Resolver.on_query`` recording each DNS
query and its answer or failure on the way.  Each target can then be probed
with one OPTIONS (``proxy.transport.ping``, RFC 3261 §11; TLS with the
``[tls]`` client context and the pool FQDN as the name to check, RFC 5922
§7.3), concurrently, each bounded by a timeout.

The result is an ``Explanation`` (plain data), rendered by ``render_text`` for
people and ``as_json`` for machines.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dns.rdtypes.IN.SRV import SRV

from proxy import routing, tls
from proxy.config import Settings
from proxy.resolve import SERVICES, QueryRecord, ResolveError, Resolver, Target
from proxy.sip.uri import SipUri
from proxy.store import Endpoint, Snapshot
from proxy.transport.ping import PingResult, ping

RANDOM_ORDER_NOTE = (
    "SRV records of equal priority are put in weighted random order (RFC 2782),"
    " anew for every request: another run may list them differently"
)

Pinger = Callable[..., PingResult]


@dataclass(frozen=True, slots=True)
class DnsStep:
    """One DNS query: ``outcome`` is ``answer``, ``NXDOMAIN``, ``NODATA``,
    ``timeout`` or another failure; ``records`` are the answer's records as
    text (SRV: ``priority weight port target``)."""

    name: str
    type: str
    outcome: str
    records: list[str]
    ttl: int | None
    elapsed_ms: float


@dataclass(frozen=True, slots=True)
class Health:
    """An OPTIONS probe: ``up`` for any final answer but 503 (RFC 3263 §4.3
    counts 503 as a failed server, as the daemon does)."""

    state: str
    status: int | None = None
    reason: str | None = None
    rtt_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TargetReport:
    host: str
    address: str
    port: int
    transport: str
    health: Health | None = None


@dataclass(slots=True)
class Explanation:
    uri: str
    key: str
    endpoint: Endpoint | None
    mode: str | None
    mode_reason: str
    answer: str
    lookup: str | None = None
    nameservers: list[str] = field(default_factory=list)
    dns: list[DnsStep] = field(default_factory=list)
    targets: list[TargetReport] = field(default_factory=list)
    resolve_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.endpoint is not None


# the decision --------------------------------------------------------------------------
def decide(
    snapshot: Snapshot, uri_text: str, settings: Settings, config: Path | None
) -> Explanation:
    """Which endpoint, which mode and why, what the daemon answers (the same
    ``routing.decide`` the daemon calls).  Raises ``UriError`` for a URI
    that does not parse."""
    uri = SipUri.parse(uri_text)
    default = settings.server.mode
    decision = routing.decide(snapshot, uri, default)
    key = uri.aor_key
    if isinstance(decision, routing.NotFound):
        return Explanation(
            uri_text,
            key,
            None,
            None,
            "no endpoint",
            '404 Not Found, ms-diagnostics 52001 "No persistent chat endpoint for %s"' % key,
        )
    endpoint = decision.endpoint
    if endpoint.mode is not None:
        mode, why = endpoint.mode, "the endpoint sets mode %s" % endpoint.mode
    else:
        where = "in %s" % config if config is not None else "(built-in default)"
        mode, why = default, "the endpoint inherits [server] mode = %s %s" % (default, where)
    if isinstance(decision, routing.Redirect):
        answer = "302 Moved Temporarily, Contact: %s" % decision.contact
    else:
        answer = "forwarded (RFC 3261 §16) to the first target below that answers"
    explanation = Explanation(uri_text, key, endpoint, mode, why, answer)
    if endpoint.pool_port is not None:
        explanation.lookup = "the endpoint names port %d: A/AAAA of %s, no SRV (RFC 3263 §4.2)" % (
            endpoint.pool_port,
            endpoint.pool_fqdn,
        )
    else:
        transports = [endpoint.pool_transport] if endpoint.pool_transport else list(SERVICES)
        explanation.lookup = (
            "SRV %s (RFC 3263 §4.1), then A/AAAA of each SRV target;"
            " without SRV records, A/AAAA of %s on port %d over %s (§4.2)"
            % (
                ", ".join(SERVICES[t] for t in transports),
                endpoint.pool_fqdn,
                settings.proxy.default_port,
                (endpoint.pool_transport or settings.proxy.default_transport).upper(),
            )
        )
    if isinstance(decision, routing.Redirect):
        explanation.notes.append(
            "redirect mode: pcproxy does not resolve the pool, the upstream proxy resolves"
            " the Contact itself; the targets below are what RFC 3263 gives for it"
        )
    return explanation


# the DNS plan --------------------------------------------------------------------------
async def resolve(explanation: Explanation, settings: Settings) -> list[Target]:
    """The daemon's plan for the endpoint's pool, each query recorded."""
    endpoint = explanation.endpoint
    assert endpoint is not None
    records: list[QueryRecord] = []
    resolver = Resolver.from_settings(settings, on_query=records.append)
    explanation.nameservers = [_nameserver(ns) for ns in resolver.dns_resolver.nameservers]
    targets: list[Target] = []
    try:
        targets = await resolver.plan(
            endpoint.pool_fqdn, port=endpoint.pool_port, transport=endpoint.pool_transport
        )
    except ResolveError as exc:
        explanation.resolve_error = exc.reason
        if explanation.mode == "proxy":
            explanation.answer = (
                "503 Service Unavailable, ms-diagnostics 52005: no target (%s)" % exc.reason
            )
    records.sort(key=lambda r: r.seq)
    explanation.dns = [_step(r) for r in records]
    explanation.targets = [TargetReport(t.host, t.address, t.port, t.transport) for t in targets]
    srv_found = any(r.rdtype == "SRV" and r.lookup.rdataset for r in records)
    if endpoint.pool_port is None and not srv_found and targets:
        explanation.notes.append(
            "no SRV record for %s: its own A/AAAA on the default port, RFC 3263 §4.2"
            % endpoint.pool_fqdn
        )
    if any(_equal_priorities(r) for r in records):
        explanation.notes.append(RANDOM_ORDER_NOTE)
    return targets


def _nameserver(server: object) -> str:
    address, port = getattr(server, "address", None), getattr(server, "port", 53)
    if address is None:
        return str(server)
    return "%s:%d" % ("[%s]" % address if ":" in address else address, port)


def _step(record: QueryRecord) -> DnsStep:
    lookup = record.lookup
    rdataset = lookup.rdataset
    if rdataset:
        rdatas = list(rdataset)
        if record.rdtype == "SRV":
            rdatas.sort(key=lambda r: (r.priority, -r.weight, r.port, str(r.target)))
        return DnsStep(
            record.name,
            record.rdtype,
            "answer",
            [r.to_text() for r in rdatas],
            int(rdataset.ttl),
            round(record.elapsed * 1000.0, 1),
        )
    outcome = {"no records": "NODATA", "DNS timeout": "timeout"}.get(
        lookup.reason or "", lookup.reason or "no records"
    )
    return DnsStep(record.name, record.rdtype, outcome, [], None, round(record.elapsed * 1000, 1))


def _equal_priorities(record: QueryRecord) -> bool:
    if record.rdtype != "SRV" or not record.lookup.rdataset:
        return False
    counts = Counter(r.priority for r in record.lookup.rdataset if isinstance(r, SRV))
    return any(n > 1 for n in counts.values())


# health ----------------------------------------------------------------------------------
async def probe(
    explanation: Explanation,
    targets: Sequence[Target],
    settings: Settings,
    timeout: float,
    pinger: Pinger = ping,
) -> None:
    """One OPTIONS to every target at once (RFC 3261 §11), each within ``timeout``."""
    endpoint = explanation.endpoint
    assert endpoint is not None
    context: ssl.SSLContext | None = None
    context_error: str | None = None
    if any(t.transport == "tls" for t in targets):
        try:
            context = tls.client_context(settings.tls)
        except tls.TlsConfigError as exc:
            context_error = str(exc)

    async def one(target: Target) -> Health:
        if target.transport == "tls" and context is None:
            return Health("down", error="no TLS client context: %s" % context_error)
        try:
            result = await asyncio.to_thread(
                pinger,
                target.address,
                target.port,
                target.transport,
                timeout,
                context=context if target.transport == "tls" else None,
                server_hostname=endpoint.pool_fqdn,
            )
        except TimeoutError:
            return Health("down", error="no answer within %gs" % timeout)
        except ssl.SSLError as exc:
            return Health("down", error="TLS: %s" % (exc.reason or exc))
        except OSError as exc:
            return Health("down", error=(exc.strerror or str(exc)).lower())
        state = "down" if result.status == 503 else "up"
        return Health(state, result.status, result.reason, round(result.rtt_ms, 1))

    healths = await asyncio.gather(*(one(t) for t in targets))
    explanation.targets = [
        TargetReport(t.host, t.address, t.port, t.transport, h)
        for t, h in zip(targets, healths, strict=True)
    ]


# output ----------------------------------------------------------------------------------
def as_json(explanation: Explanation) -> dict[str, Any]:
    """Plain data for ``--json``."""
    out = asdict(explanation)
    out["found"] = explanation.found
    return out


def render_text(explanation: Explanation) -> list[str]:
    """The readable report, one line per fact."""
    e = explanation
    lines = [e.uri]
    if e.endpoint is None:
        lines.append("  endpoint  none: no endpoint has the key %s" % e.key)
        lines.append("  answer    %s" % e.answer)
        return lines
    ep = e.endpoint
    extra = []
    if ep.pool_port is not None:
        extra.append("port %d" % ep.pool_port)
    if ep.pool_transport:
        extra.append(ep.pool_transport)
    lines.append(
        "  endpoint  %s (key %s) -> pool %s%s"
        % (ep.sip_address, e.key, ep.pool_fqdn, " (%s)" % ", ".join(extra) if extra else "")
    )
    lines.append("  mode      %s: %s" % (e.mode, e.mode_reason))
    lines.append("  answer    %s" % e.answer)
    if e.lookup:
        lines.append("  lookup    %s" % e.lookup)
    lines.append("")
    lines.append("DNS queries (nameservers: %s)" % (", ".join(e.nameservers) or "none"))
    for n, step in enumerate(e.dns, 1):
        if step.outcome == "answer":
            result = "TTL %d" % (step.ttl or 0)
        else:
            result = step.outcome
        took = "(%.1f ms)" % step.elapsed_ms
        lines.append("  %d. %-4s %s  %s  %s" % (n, step.type, step.name, result, took))
        for record in step.records:
            if step.type == "SRV" and len(record.split()) == 4:
                record = "priority %s weight %s port %s target %s" % tuple(record.split())
            lines.append("       %s" % record)
    if e.resolve_error:
        lines.append("  no target: %s" % e.resolve_error)
    if e.targets:
        lines.append("")
        lines.append("Targets in the order pcproxy tries them (RFC 3263 §4.3 failover)")
        for n, t in enumerate(e.targets, 1):
            host = "[%s]" % t.address if ":" in t.address else t.address
            where = "%s:%d/%s" % (host, t.port, t.transport)
            lines.append("  %d. %-26s %-30s %s" % (n, where, t.host, _health(t.health)))
    for note in e.notes:
        lines.append("note: %s" % note)
    return lines


def _health(health: Health | None) -> str:
    if health is None:
        return "(not probed)"
    if health.status is not None:
        return "%-4s %d %s, %.1f ms" % (
            health.state,
            health.status,
            health.reason or "",
            health.rtt_ms or 0.0,
        )
    return "%-4s %s" % (health.state, health.error or "")
