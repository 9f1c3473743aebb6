"""The metrics collector and the HTTP pages, driven without the daemon."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admission import Admission
from proxy.config import Settings
from proxy.element import Element
from proxy.metrics import (
    MAX_REQUEST,
    STALL_AFTER,
    ElementCollector,
    HttpAnswer,
    MetricsServer,
    Page,
    route,
)
from proxy.resolve import Resolver, Target
from proxy.transport import Transports

from .sipmsg import UDP_PEER, endpoint, make_element, request, sends

OTHER = "sip:legacychat@contoso.com"


@dataclass
class Observed:
    element: Element | None
    transports: Transports | None = None
    resolver: Resolver = field(default_factory=lambda: Resolver(nameservers=["127.0.0.1"]))
    admission: Admission = field(default_factory=lambda: Admission(Settings()))
    ready: bool = True


def fake_transports(**values: object) -> Transports:
    fields = {
        "counters_dropped": 0,
        "undeliverable": 0,
        "tls_handshake_failures": 0,
        "connections": {},
        "counters": Counter(),
        **values,
    }
    return cast(Transports, SimpleNamespace(**fields))


def scrape(observed: Observed) -> dict[str, float]:
    """Every sample of a scrape of a fresh server, keyed ``name{k=v,...}``."""
    text = generate_latest(MetricsServer(observed).registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
            samples["%s{%s}" % (s.name, labels)] = s.value
    return samples


def traffic() -> Element:
    """An element that redirected two INVITEs and answered a 404 and an OPTIONS."""
    element = make_element(endpoint(), endpoint(OTHER, "pcpool2.contoso.com"))
    for n, data in enumerate(
        [
            request(branch="z9hG4bK-m1"),
            request(branch="z9hG4bK-m2"),
            request(uri=OTHER, branch="z9hG4bK-m3"),
            request(uri="sip:nobody@contoso.com", branch="z9hG4bK-m4"),
            request("OPTIONS", "sip:127.0.0.1:5060", branch="z9hG4bK-m5"),
        ]
    ):
        sends(element.receive(data, UDP_PEER, float(n)))
    return element


# the collector ---------------------------------------------------------------------
def test_scrape_counts_requests_responses_and_redirects_by_endpoint() -> None:
    samples = scrape(Observed(traffic()))
    assert samples["pcproxy_requests_total{method=INVITE}"] == 4
    assert samples["pcproxy_requests_total{method=OPTIONS}"] == 1
    assert samples["pcproxy_responses_total{code=302}"] == 3
    assert samples["pcproxy_responses_total{code=404}"] == 1
    assert samples["pcproxy_responses_total{code=200}"] == 1
    assert samples["pcproxy_redirects_total{endpoint=sip:ocschat@contoso.com}"] == 2
    assert samples["pcproxy_redirects_total{endpoint=%s}" % OTHER] == 1
    assert samples["pcproxy_not_found_total{}"] == 1


def test_scrape_reads_in_flight_table_and_readiness_from_the_live_element() -> None:
    element = traffic()
    samples = scrape(Observed(element))
    # three 302s over UDP wait for their ACK (RFC 3261 §17.2.1)
    assert samples["pcproxy_transactions_in_flight{}"] == element.in_flight() == 4
    assert samples["pcproxy_table_endpoints{}"] == 2
    assert samples["pcproxy_table_generation{}"] == element.snapshot.generation
    assert samples["pcproxy_ready{}"] == 1 and samples["pcproxy_draining{}"] == 0
    element.draining = True
    samples = scrape(Observed(element))
    assert samples["pcproxy_ready{}"] == 0 and samples["pcproxy_draining{}"] == 1


def test_scrape_folds_element_and_stream_drops_and_reads_tls_failures() -> None:
    element = make_element()
    sends(element.receive(b"garbage\r\n\r\n", UDP_PEER, 0.0))
    transports = fake_transports(counters_dropped=3, tls_handshake_failures=2)
    samples = scrape(Observed(element, transports))
    assert samples["pcproxy_malformed_dropped_total{layer=element}"] == 1
    assert samples["pcproxy_malformed_dropped_total{layer=stream}"] == 3
    assert samples["pcproxy_tls_handshake_failures_total{}"] == 2


def test_tls_handshake_failures_is_zero_when_transports_do_not_count_them() -> None:
    samples = scrape(Observed(make_element(), fake_transports()))
    assert samples["pcproxy_tls_handshake_failures_total{}"] == 0


def test_trust_boundary_refusals_and_refused_connections_are_counted() -> None:
    settings = Settings.model_validate({"security": {"trusted_networks": ["10.0.0.0/8"]}})
    admission = Admission(settings)
    admission.check(request("OPTIONS"), "192.0.2.9", 0.0)  # outside: 403
    admission.check(b"SIP/2.0 200 OK\r\n\r\n", "192.0.2.9", 0.0)  # a response: dropped
    transports = fake_transports(counters=Counter({"connections_refused_per_source": 4}))
    samples = scrape(Observed(make_element(), transports, admission=admission))
    assert samples["pcproxy_admission_refused_total{reason=untrusted}"] == 1
    assert samples["pcproxy_admission_refused_total{reason=untrusted_dropped}"] == 1
    assert samples["pcproxy_admission_refused_total{reason=rate_limited_answered}"] == 0
    assert samples["pcproxy_connections_refused_total{bound=per_source}"] == 4
    assert samples["pcproxy_connections_refused_total{bound=total}"] == 0


def test_remembered_failed_pool_servers_are_gauges_per_target() -> None:
    resolver = Resolver(nameservers=["127.0.0.1"])
    resolver.mark_failed(Target("pcpool.contoso.com", "192.0.2.21", 5041, "tls"))
    samples = scrape(Observed(make_element(), resolver=resolver))
    assert samples["pcproxy_pool_target_down{address=192.0.2.21,port=5041,transport=tls}"] == 1
    assert samples["pcproxy_pool_targets_down{}"] == 1


def test_dns_outcomes_and_latency_come_from_the_resolver() -> None:
    resolver = Resolver(nameservers=["127.0.0.1"])
    server = MetricsServer(Observed(make_element(), resolver=resolver))
    resolver.outcomes["nxdomain"] += 2
    assert resolver.on_outcome is not None
    resolver.on_outcome("nxdomain", 0.003)
    text = generate_latest(server.registry).decode()
    assert 'pcproxy_dns_queries_total{outcome="nxdomain"} 2.0' in text
    assert 'pcproxy_dns_query_duration_seconds_count{outcome="nxdomain"} 1.0' in text
    assert 'pcproxy_dns_query_duration_seconds_bucket{le="0.005",outcome="nxdomain"} 1.0' in text


def test_an_unknown_element_counter_is_exposed_by_name() -> None:
    element = make_element()
    element.counters["something_new"] += 5
    assert scrape(Observed(element))["pcproxy_events_total{event=something_new}"] == 5


def test_scrape_before_the_element_exists_is_not_ready() -> None:
    samples = scrape(Observed(None, ready=False))
    assert samples["pcproxy_ready{}"] == 0
    assert "pcproxy_transactions_in_flight{}" not in samples


def test_every_metric_of_the_collector_is_named_pcproxy() -> None:
    text = generate_latest(ElementCollector(Observed(traffic()))).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names and all(n.startswith("pcproxy_") for n in names)


# the pages ----------------------------------------------------------------------------
def _pages() -> dict[str, Page]:
    return {"/metrics": lambda headers: HttpAnswer(200, b"m")}


def test_get_and_head_of_a_page_are_served() -> None:
    for method in ("GET", "HEAD"):
        assert route(method, "/metrics?x=1", {}, _pages()).status == 200


def test_an_unknown_path_is_404_and_another_method_405_with_allow() -> None:
    assert route("GET", "/nope", {}, _pages()).status == 404
    answer = route("POST", "/metrics", {}, _pages())
    assert answer.status == 405 and ("Allow", "GET, HEAD") in answer.headers


def test_readyz_is_503_before_ready_200_when_ready_503_while_draining() -> None:
    element = make_element()
    observed = Observed(element, ready=False)
    server = MetricsServer(observed)
    assert server.readyz({}) == HttpAnswer(503, b"starting\n")
    observed.ready = True
    assert server.readyz({}).status == 200
    element.draining = True
    assert server.readyz({}) == HttpAnswer(503, b"draining\n")


def test_healthz_is_503_when_the_loop_probe_stopped_firing() -> None:
    server = MetricsServer(Observed(make_element()))
    server.lag.record(0.001, now=100.0)
    assert server.lag.turning(100.0 + STALL_AFTER)
    assert not server.lag.turning(100.0 + STALL_AFTER + 1.0)


# the listener, over a loopback socket ----------------------------------------------------
async def _http(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    return out


@pytest.mark.asyncio
async def test_listener_answers_one_request_per_connection_with_h11() -> None:
    server = MetricsServer(Observed(traffic()))
    await server.start("127.0.0.1", 0)
    assert server.bound is not None
    port = server.bound[1]
    try:
        got = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"pcproxy_requests_total" in body and b"process_" in body
        assert b"connection: close" in head.lower()
        got = await _http(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n")
        assert (await _http(port, b"DELETE /readyz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 405 "
        )
        assert (await _http(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 404 "
        )
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (2 * MAX_REQUEST) + b"\r\n\r\n"
        assert (await _http(port, huge)).startswith(b"HTTP/1.1 431 ")
        assert (await _http(port, b"NOT HTTP\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_openmetrics_is_served_when_asked_for() -> None:
    server = MetricsServer(Observed(make_element()))
    await server.start("127.0.0.1", 0)
    assert server.bound is not None
    try:
        got = await _http(
            server.bound[1],
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n",
        )
        assert b"application/openmetrics-text" in got.partition(b"\r\n\r\n")[0]
        assert got.endswith(b"# EOF\n")
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_the_lag_probe_fires_on_the_loop() -> None:
    server = MetricsServer(Observed(make_element()), lag_interval=0.01)
    await server.start("127.0.0.1", 0)
    try:
        await asyncio.sleep(0.1)
        text = generate_latest(server.registry).decode()
        count = [
            line
            for line in text.splitlines()
            if line.startswith("pcproxy_event_loop_lag_seconds_count")
        ]
        assert count and float(count[0].split()[-1]) >= 2
    finally:
        await server.close()


def test_the_readme_lists_every_metric() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.partition("## Metrics and health")[2].partition("\n## ")[0]
    text = generate_latest(MetricsServer(Observed(traffic())).registry).decode()
    names = {f.name for f in text_string_to_metric_families(text) if f.name.startswith("pcproxy_")}
    assert len(names) > 30
    assert sorted(n for n in names if "`%s" % n not in section) == []
