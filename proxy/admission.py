"""Who may talk to pcproxy, and how fast: the trust boundary before the element.

Theory of operation
-------------------
pcproxy sits behind Lync Front End servers as a trusted server: it forwards
what they send, unchanged (README, "Trust boundary").  Anyone else who can reach
its port must not be able to use it as a relay or to exhaust it, so every
message a listener receives passes :meth:`Admission.check` before
``Element.receive`` sees it:

1. **Trusted networks.** The source address must lie in one of
   ``[security] trusted_networks``.  A request from anywhere else is refused
   with 403 (RFC 3261 §8.2: a UAS may refuse what it will not serve; §21.4.4);
   an ACK or a response from there is dropped, never answered (§17.2.1, §18.1.2).
2. **Certificate names.** On an accepted TLS connection whose peer
   certificate was verified by the handshake, ``[tls] allowed_peers`` (when
   not empty) must list one of the certificate's SIP domain identities
   (RFC 5922 §7.1, compared per §7.2); otherwise as 1.
3. **Rate.** Requests from one source address draw from a token bucket of
   ``rate`` tokens per second and ``burst`` tokens deep.  ACK and CANCEL draw
   from a second bucket of the same size, so a flood of INVITEs from a
   source cannot starve the ACKs and CANCELs that end its own transactions
   (RFC 3261 §9, §17.1.1.3).  Over the limit, a request on a stream (TCP,
   TLS) is answered 503 with Retry-After (RFC 3261 §21.5.4; RFC 5390 §3.1
   recommends rejecting rather than silently dropping where the sender
   learns from it) and a datagram is dropped silently: a UDP source address
   proves nothing, and answering a spoofed flood would reflect it.
   Responses are never rate limited: they belong to pcproxy's own
   transactions, and dropping them only causes retransmissions.

Every answer to a refused request (403 or 503) spends a token of a third,
small bucket per source (:data:`ANSWER_RATE` per second): answering a flood
must not become a flood.  Beyond it the request is dropped and counted.

Verdicts on the source address are cached per address string, so the
``ipaddress`` parse (slow) happens once per source; the table of sources is
an LRU of at most ``max_sources`` entries, so a flood of spoofed source
addresses costs bounded memory (an evicted source comes back with full
buckets, which only favours it).

This module is pure: no sockets, no asyncio and no clock.  The clock is the
``now`` argument (the loop's monotonic time in the daemon, a fake clock in the
tests); a library rate limiter reading its own wall clock would break that,
which is why the token bucket is the few lines below.  :meth:`configure`
swaps networks, names and limits at run time (SIGHUP), keeping the buckets.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Final

from proxy.config import Settings
from proxy.tls import identity_matches

#: Refusals answered per second (and at once) per source; beyond, dropped.
ANSWER_RATE: Final = 5.0
#: Sources whose verdict and buckets are remembered (an LRU beyond).
MAX_SOURCES: Final = 16384

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Admitted:
    """Hand the message to the element."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Answer the request with ``status`` (403 or 503) and go no further.

    ``reason`` is for ms-diagnostics; ``retry_after`` (seconds) goes in the
    503's Retry-After header (RFC 3261 §20.33).
    """

    status: int
    reason: str
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """Neither answer nor forward; ``why`` is the counter it was counted in."""

    why: str


Verdict = Admitted | Refused | Dropped
ADMITTED: Final = Admitted()


class _Bucket:
    """A token bucket: ``tokens`` at time ``stamp``, refilled lazily."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def take(self, rate: float, depth: float, now: float) -> bool:
        """Spend one token if there is one (refilling ``rate``/s up to ``depth``)."""
        elapsed = now - self.stamp
        if elapsed > 0.0:
            self.tokens = min(depth, self.tokens + elapsed * rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self, rate: float) -> int:
        """Whole seconds until the next token (at least 1)."""
        return max(1, ceil((1.0 - self.tokens) / rate))


class _Source:
    __slots__ = ("trusted", "requests", "priority", "answers")

    def __init__(self, trusted: bool, burst: float, now: float) -> None:
        self.trusted = trusted
        self.requests = _Bucket(burst, now)
        self.priority = _Bucket(burst, now)
        self.answers = _Bucket(ANSWER_RATE, now)


def parse_networks(texts: Iterable[str]) -> tuple[_Network, ...]:
    """CIDR strings to networks (host bits must be zero)."""
    return tuple(ipaddress.ip_network(text, strict=True) for text in texts)


def address_in(host: str, networks: Sequence[_Network]) -> bool:
    """Whether ``host`` (v4, v6, v4-mapped v6, with a scope) is in one of ``networks``."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


class Admission:
    """The per-message trust and rate decision; see the module docstring.

    ``counters`` counts every refusal: ``untrusted`` (403 sent to a source
    outside the trusted networks), ``untrusted_name`` (403 sent on a TLS
    connection whose certificate names are not allowed), ``untrusted_dropped``
    (ACK, response or over the answer allowance from such a source: nothing
    sent), ``rate_limited_answered`` (503 sent), ``rate_limited_dropped``
    (over the rate and not answered: a datagram, an ACK, or over the answer
    allowance).
    """

    def __init__(self, settings: Settings, *, max_sources: int = MAX_SOURCES) -> None:
        self.counters: Counter[str] = Counter()
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._names: dict[tuple[str, ...], bool] = {}
        self.networks: tuple[_Network, ...] = ()
        self.allowed_names: tuple[str, ...] = ()
        self.rate = 0.0
        self.burst = 1.0
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take ``[security]`` and ``[tls] allowed_peers`` from ``settings``
        (start, or a SIGHUP reload).  Cached verdicts are recomputed; the
        buckets are kept, so a reload is no way around the rate limit."""
        security = settings.security
        self.networks = parse_networks(security.trusted_networks)
        self.allowed_names = tuple(settings.tls.allowed_peers)
        self.rate = float(security.rate)
        self.burst = float(security.burst)
        self._names.clear()
        networks = self.networks
        for host, source in self._sources.items():
            source.trusted = address_in(host, networks)

    def __len__(self) -> int:
        """Sources currently remembered."""
        return len(self._sources)

    def check(
        self,
        data: bytes,
        host: str,
        now: float,
        *,
        stream: bool = False,
        names: Sequence[str] | None = None,
    ) -> Verdict:
        """The verdict on one message from source address ``host``.

        ``stream`` is true for TCP and TLS; ``names`` are the SIP domain
        identities of the verified peer certificate of an accepted TLS
        connection (``None`` for every other transport).  Only the first
        bytes of ``data`` are looked at: a response, an ACK, a CANCEL.
        """
        sources = self._sources
        source = sources.get(host)
        if source is None:
            source = sources[host] = _Source(address_in(host, self.networks), self.burst, now)
            if len(sources) > self.max_sources:
                sources.popitem(last=False)
        else:
            sources.move_to_end(host)
        response = data[:4] == b"SIP/"
        if not source.trusted:
            return self._untrusted(source, data, response, now, "untrusted", host)
        if names is not None and self.allowed_names and not self._names_allowed(names):
            return self._untrusted(source, data, response, now, "untrusted_name", host)
        if response or self.rate <= 0.0:
            return ADMITTED
        head = data[:7]
        if head[:4] == b"ACK " or head == b"CANCEL ":
            if source.priority.take(self.rate, self.burst, now):
                return ADMITTED
            self.counters["rate_limited_dropped"] += 1
            return Dropped("rate_limited_dropped")
        bucket = source.requests
        if bucket.take(self.rate, self.burst, now):
            return ADMITTED
        if not data.strip(b"\r\n \t"):
            return ADMITTED  # a keep-alive (RFC 5626 §3.5.1) costs nothing
        if stream and source.answers.take(ANSWER_RATE, ANSWER_RATE, now):
            self.counters["rate_limited_answered"] += 1
            return Refused(
                503,
                "more than %g requests/s from %s" % (self.rate, host),
                bucket.wait(self.rate),
            )
        self.counters["rate_limited_dropped"] += 1
        return Dropped("rate_limited_dropped")

    def _untrusted(
        self, source: _Source, data: bytes, response: bool, now: float, why: str, host: str
    ) -> Verdict:
        if (
            response
            or data[:4] == b"ACK "
            or not data.strip(b"\r\n \t")
            or not source.answers.take(ANSWER_RATE, ANSWER_RATE, now)
        ):
            self.counters["untrusted_dropped"] += 1
            return Dropped("untrusted_dropped")
        self.counters[why] += 1
        if why == "untrusted":
            return Refused(403, "source %s is not in a trusted network" % host)
        return Refused(403, "peer certificate names no allowed peer")

    def _names_allowed(self, names: Sequence[str]) -> bool:
        key = tuple(names)
        verdict = self._names.get(key)
        if verdict is None:
            if len(self._names) >= 1024:
                self._names.clear()
            verdict = self._names[key] = any(
                identity_matches(key, allowed) for allowed in self.allowed_names
            )
        return verdict
