"""Observability: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP.

Theory of operation
-------------------
The metrics listener is a small HTTP/1.1 server on the daemon's own asyncio
loop, next to the SIP listeners, so a scrape reads the element, the
transports and the resolver between two SIP messages: every number in one
scrape is from one instant, and no thread or lock is involved.  h11 parses
the request (bounded in size and time); one request is answered per
connection, which is then closed.

Nothing is counted here on the SIP path.  ``ElementCollector`` turns the
live objects into Prometheus metric families at scrape time: the element's
``counters`` (plain ``Counter[str]`` increments it already makes), its
transaction tables and snapshot, the transports' drop counts and the
resolver's outcome counts and failure memory.  Two things are observed as
they happen, both off the SIP hot path: the latency of each query sent to the
DNS (``Resolver.on_outcome``, already asynchronous I/O) and the event loop's
lag, measured by a periodic timer that notes how late it fires.

``/healthz`` is 200 while the loop turns (the lag probe has fired recently);
``/readyz`` is 200 once the table is loaded and the SIP listeners are bound,
and 503 before that and while draining after SIGTERM, so a load balancer
stops sending new work before the daemon exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import h11
import structlog
from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from proxy.admission import Admission
from proxy.element import Element
from proxy.resolve import Resolver
from proxy.transport import Transports

log = structlog.get_logger("metrics")

#: Largest request head accepted (request line and headers); larger is 431.
MAX_REQUEST = 8192
#: Seconds a client has to send its request.
READ_TIMEOUT = 5.0
#: HTTP connections served at once; more are closed at once.
MAX_CONNECTIONS = 64
#: Seconds between two event-loop lag measurements.
LAG_INTERVAL = 0.5
#: A loop whose lag probe has not fired for this long is not turning.
STALL_AFTER = 10.0

DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Element counters exposed one to one: key -> (metric name, help).
SIMPLE_COUNTERS: Mapping[str, tuple[str, str]] = {
    "retransmissions": (
        "pcproxy_retransmissions",
        "Request retransmissions absorbed by an existing server transaction.",
    ),
    "ack_absorbed": ("pcproxy_acks_absorbed", "ACKs absorbed (a non-2xx ACK or no transaction)."),
    "not_found": ("pcproxy_not_found", "Requests for a URI not in the endpoint table (404)."),
    "in_dialog": ("pcproxy_in_dialog_requests", "In-dialog requests routed along a dialog."),
    "forged_route": (
        "pcproxy_forged_routes",
        "Requests whose Route named pcproxy without a valid token (403/481).",
    ),
    "forwarded": (
        "pcproxy_forwarded_requests",
        "Requests sent to a target (one per target tried, failovers included).",
    ),
    "failovers": ("pcproxy_failovers", "Requests sent to the next target after one failed."),
    "answered": ("pcproxy_proxied_answered", "Proxied requests answered with a 2xx."),
    "cancelled": ("pcproxy_cancels", "CANCELs that matched a proxied INVITE."),
    "cancels_sent": ("pcproxy_cancels_sent", "CANCELs sent to a pool server."),
    "pool_unreachable": (
        "pcproxy_pool_unreachable",
        "Requests answered 503 because no server of the pool answered.",
    ),
    "responses_absorbed": (
        "pcproxy_responses_absorbed",
        "Responses that matched no client transaction.",
    ),
    "malformed_answered": (
        "pcproxy_malformed_answered",
        "Malformed requests answered with 400/505/513.",
    ),
}
#: Element counter keys that feed labelled families: key prefix -> (name, label, help).
LABELLED_COUNTERS: Mapping[str, tuple[str, str, str]] = {
    "requests.": ("pcproxy_requests", "method", "SIP requests received, by method."),
    "responses.": (
        "pcproxy_responses",
        "code",
        "Responses pcproxy made itself (not forwarded ones), by status code.",
    ),
    "redirect_by.": (
        "pcproxy_redirects",
        "endpoint",
        "Requests answered 302, by endpoint SIP address.",
    ),
    "forward_by.": (
        "pcproxy_forwards",
        "endpoint",
        "Requests proxied to an endpoint's pool, by endpoint SIP address.",
    ),
}
#: Keys folded into other families (the sums of the per-endpoint ones, drops).
FOLDED = frozenset(("redirects", "proxied", "malformed_dropped"))


#: The refusals ``Admission.counters`` keeps.
ADMISSION_REASONS = (
    "untrusted",
    "untrusted_name",
    "untrusted_dropped",
    "rate_limited_answered",
    "rate_limited_dropped",
)


class Observed(Protocol):
    """What the collector and the health pages read: the server's live objects."""

    element: Element | None
    transports: Transports | None
    resolver: Resolver
    admission: Admission
    ready: bool


class ElementCollector:
    """A Prometheus collector that reads the daemon's live objects at scrape time."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed

    def collect(self) -> Iterable[Metric]:
        obs = self.observed
        element, transports, resolver = obs.element, obs.transports, obs.resolver
        yield from self._element(element)
        dropped = CounterMetricFamily(
            "pcproxy_malformed_dropped",
            "Malformed input dropped without an answer: by the parser (element) "
            "or unframeable streams closed (stream).",
            labels=["layer"],
        )
        dropped.add_metric(["element"], element.counters["malformed_dropped"] if element else 0)
        dropped.add_metric(["stream"], transports.counters_dropped if transports else 0)
        yield dropped
        yield CounterMetricFamily(
            "pcproxy_tls_handshake_failures",
            "TLS handshakes that failed, on listeners and toward pools.",
            value=transports.tls_handshake_failures if transports else 0,
        )
        refused = CounterMetricFamily(
            "pcproxy_admission_refused",
            "Messages stopped at the trust boundary, by reason: untrusted (403), "
            "untrusted_name (403, TLS certificate), untrusted_dropped (ACK or response), "
            "rate_limited_answered (503), rate_limited_dropped.",
            labels=["reason"],
        )
        for reason in ADMISSION_REASONS:
            refused.add_metric([reason], obs.admission.counters[reason])
        yield refused
        connections = CounterMetricFamily(
            "pcproxy_connections_refused",
            "TCP/TLS connections closed at accept: the total or the per-source bound was reached.",
            labels=["bound"],
        )
        counts = transports.counters if transports else {}
        connections.add_metric(["total"], counts.get("connections_refused_total", 0))
        connections.add_metric(["per_source"], counts.get("connections_refused_per_source", 0))
        yield connections
        yield CounterMetricFamily(
            "pcproxy_undeliverable",
            "Messages that could not be sent (their connection or socket was gone).",
            value=transports.undeliverable if transports else 0,
        )
        yield GaugeMetricFamily(
            "pcproxy_stream_connections",
            "TCP and TLS connections open, accepted and outbound.",
            value=len(transports.connections) if transports else 0,
        )
        yield from self._resolver(resolver)
        ready = GaugeMetricFamily("pcproxy_ready", "1 when /readyz answers 200.")
        ready.add_metric([], 1 if is_ready(obs) else 0)
        yield ready
        yield GaugeMetricFamily(
            "pcproxy_draining",
            "1 after SIGTERM/SIGINT, while in-flight transactions finish.",
            value=1 if element is not None and element.draining else 0,
        )

    def _element(self, element: Element | None) -> Iterable[Metric]:
        labelled = {
            prefix: CounterMetricFamily(name, text, labels=[label])
            for prefix, (name, label, text) in LABELLED_COUNTERS.items()
        }
        simple = {key: 0 for key in SIMPLE_COUNTERS}
        other = CounterMetricFamily(
            "pcproxy_events", "Other element counters, by name.", labels=["event"]
        )
        for key, value in element.counters.items() if element is not None else ():
            if key in simple:
                simple[key] = value
                continue
            prefix, dot, rest = key.partition(".")
            family = labelled.get(prefix + dot) if dot else None
            if family is not None:
                family.add_metric([rest], value)
            elif key not in FOLDED:
                other.add_metric([key], value)
        yield from labelled.values()
        for key, (name, text) in SIMPLE_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=simple[key])
        yield other
        if element is None:
            return
        yield GaugeMetricFamily(
            "pcproxy_transactions_in_flight",
            "Transactions that still owe the network something (what a drain waits for).",
            value=element.in_flight(),
        )
        yield GaugeMetricFamily(
            "pcproxy_server_transactions",
            "Server transactions kept (answered ones linger for retransmissions).",
            value=len(element.transactions),
        )
        yield GaugeMetricFamily(
            "pcproxy_client_transactions",
            "Client transactions toward pool servers.",
            value=len(element.clients),
        )
        yield GaugeMetricFamily(
            "pcproxy_proxy_contexts", "Requests being proxied.", value=len(element.contexts)
        )
        yield GaugeMetricFamily(
            "pcproxy_table_generation",
            "Generation of the endpoint table snapshot in service (counts committed writes).",
            value=element.snapshot.generation,
        )
        yield GaugeMetricFamily(
            "pcproxy_table_endpoints",
            "Endpoints in the snapshot in service.",
            value=len(element.snapshot),
        )

    def _resolver(self, resolver: Resolver) -> Iterable[Metric]:
        queries = CounterMetricFamily(
            "pcproxy_dns_queries",
            "Queries sent to the DNS, by outcome "
            "(answer, nodata, nxdomain, timeout, no_nameserver, error).",
            labels=["outcome"],
        )
        for outcome, count in sorted(resolver.outcomes.items()):
            queries.add_metric([outcome], count)
        yield queries
        stats = resolver.stats
        cache = CounterMetricFamily(
            "pcproxy_dns_cache_lookups",
            "Cache lookups: fresh hit, miss (a query), stale answer served (RFC 8767).",
            labels=["result"],
        )
        cache.add_metric(["hit"], stats.hits)
        cache.add_metric(["miss"], stats.misses)
        cache.add_metric(["stale"], stats.stale)
        yield cache
        yield CounterMetricFamily(
            "pcproxy_dns_cache_evictions", "Cache entries evicted.", value=stats.evictions
        )
        yield GaugeMetricFamily(
            "pcproxy_dns_cache_entries", "Answers in the DNS cache.", value=resolver.cached()
        )
        down = GaugeMetricFamily(
            "pcproxy_pool_target_down",
            "1 for each pool server remembered as failed (tried last, RFC 3263 §4.3).",
            labels=["address", "port", "transport"],
        )
        failed = sorted(resolver.failed())
        for address, port, transport in failed:
            down.add_metric([address, str(port), transport], 1)
        yield down
        yield GaugeMetricFamily(
            "pcproxy_pool_targets_down",
            "Pool servers remembered as failed.",
            value=len(failed),
        )


def is_ready(observed: Observed) -> bool:
    """Table loaded, SIP listeners bound, not draining."""
    element = observed.element
    return observed.ready and element is not None and not element.draining


class LagProbe:
    """How late the loop runs a timer: a callback armed every ``interval``
    seconds records how long after its due time it ran."""

    def __init__(self, registry: CollectorRegistry, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "pcproxy_event_loop_lag_seconds",
            "How late a timer armed on the event loop fired.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.last = Gauge(
            "pcproxy_event_loop_last_lag_seconds",
            "Lag of the latest event-loop measurement.",
            registry=registry,
        )
        self.last_tick: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.last_tick = loop.time()
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        assert self._loop is not None
        due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.record(max(0.0, now - due), now)
        self._arm()

    def record(self, lag: float, now: float) -> None:
        self.histogram.observe(lag)
        self.last.set(lag)
        self.last_tick = now

    def turning(self, now: float) -> bool:
        """Whether the probe fired within ``STALL_AFTER`` seconds."""
        return self.last_tick is None or now - self.last_tick < STALL_AFTER + self.interval


# the HTTP side ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What one request gets: status, body and extra headers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Page = Callable[[Mapping[str, str]], HttpAnswer]


def route(
    method: str, target: str, headers: Mapping[str, str], pages: Mapping[str, Page]
) -> HttpAnswer:
    """The answer to one request (RFC 9110 §15): an unknown path is 404, a
    known one with a method other than GET or HEAD is 405 with Allow."""
    path = target.partition("?")[0]
    page = pages.get(path)
    if page is None:
        return HttpAnswer(404, b"not found\n")
    if method not in ("GET", "HEAD"):
        return HttpAnswer(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
    return page(headers)


class MetricsServer:
    """The HTTP listener of ``/metrics``, ``/healthz`` and ``/readyz``."""

    def __init__(self, observed: Observed, *, lag_interval: float = LAG_INTERVAL) -> None:
        self.observed = observed
        # a histogram's creation time is a gauge of its own in the text format:
        # noise for a daemon whose start time process_start_time_seconds gives
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ElementCollector(observed))
        ProcessCollector(registry=self.registry)
        self.dns_latency = Histogram(
            "pcproxy_dns_query_duration_seconds",
            "Time to the outcome of each query sent to the DNS, by outcome.",
            labelnames=["outcome"],
            buckets=DNS_BUCKETS,
            registry=self.registry,
        )
        self.lag = LagProbe(self.registry, lag_interval)
        observed.resolver.on_outcome = self._dns_query
        self.pages: dict[str, Page] = {
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        self.bound: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = 0

    def _dns_query(self, outcome: str, seconds: float) -> None:
        self.dns_latency.labels(outcome).observe(seconds)

    # pages
    def metrics(self, headers: Mapping[str, str]) -> HttpAnswer:
        encode, content_type = choose_encoder(headers.get("accept", ""))
        return HttpAnswer(200, encode(self.registry), content_type)

    def healthz(self, headers: Mapping[str, str]) -> HttpAnswer:
        now = self._loop.time() if self._loop is not None else None
        if now is not None and not self.lag.turning(now):
            return HttpAnswer(503, b"event loop stalled\n")
        return HttpAnswer(200, b"ok\n")

    def readyz(self, headers: Mapping[str, str]) -> HttpAnswer:
        if is_ready(self.observed):
            return HttpAnswer(200, b"ready\n")
        element = self.observed.element
        why = b"draining\n" if element is not None and element.draining else b"starting\n"
        return HttpAnswer(503, why)

    # lifecycle
    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: a free port); raises OSError naming it."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_REQUEST, reuse_address=True
            )
        except OSError as exc:
            where = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
            raise OSError("cannot listen on %s: %s" % (where, exc.strerror or exc)) from None
        self._loop = loop
        self.bound = self._server.sockets[0].getsockname()[:2]
        self.lag.start(loop)
        log.info("metrics_listening", host=self.bound[0], port=self.bound[1])

    async def close(self) -> None:
        self.lag.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open <= MAX_CONNECTIONS:
                await self._exchange(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request (bounded in size and time), answer it."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        method = "GET"
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(4096))
                    event = conn.next_event()
            if not isinstance(event, h11.Request):
                return  # the client went away
            method = event.method.decode("ascii", "replace")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            answer = route(method, event.target.decode("latin-1"), headers, self.pages)
        except h11.RemoteProtocolError as exc:
            answer = HttpAnswer(exc.error_status_hint, b"bad request\n")
        head = h11.Response(
            status_code=answer.status,
            reason=HTTPStatus(answer.status).phrase,
            headers=[
                ("Content-Type", answer.content_type),
                ("Content-Length", str(len(answer.body))),
                ("Connection", "close"),
                *answer.headers,
            ],
        )
        events: list[h11.Response | h11.Data | h11.EndOfMessage] = [head]
        if method != "HEAD":
            events.append(h11.Data(data=answer.body))
        events.append(h11.EndOfMessage())
        try:
            out = b"".join(conn.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            return  # the request left the connection where no answer fits
        writer.write(out)
        await writer.drain()
