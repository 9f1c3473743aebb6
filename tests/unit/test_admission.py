"""The trust boundary with a fake clock: networks, certificate names, rate limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from proxy.admission import (
    ADMITTED,
    ANSWER_RATE,
    Admission,
    Dropped,
    Refused,
    address_in,
    parse_networks,
)
from proxy.config import Settings
from proxy.element import DIAG_RATE_LIMITED, DIAG_UNTRUSTED
from proxy.sip.peer import Peer

from .sipmsg import TCP_PEER, UDP_PEER, header, make_element, request, response, status_of

INVITE = request("INVITE")
ACK = request("ACK", cseq_method="ACK")
CANCEL = request("CANCEL")
RESPONSE = response(200)


def settings(**security: object) -> Settings:
    return Settings.model_validate({"security": security})


def settings_tls(allowed: list[str], **security: object) -> Settings:
    return Settings.model_validate(
        {
            "security": security,
            "tls": {"require_client_certificate": True, "allowed_peers": allowed},
        }
    )


# --- networks ----------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "10.1.2.3", "172.31.255.1", "192.168.0.9", "::1", "fd00::5", "fe80::1%eth0"],
)
def test_default_networks_admit_loopback_private_and_local_addresses(host: str) -> None:
    assert Admission(Settings()).check(INVITE, host, 0.0) is ADMITTED


@pytest.mark.parametrize("host", ["8.8.8.8", "172.32.0.1", "2001:db8::1", "100.64.0.1", "junk"])
def test_default_networks_refuse_other_addresses_with_403(host: str) -> None:
    admission = Admission(Settings())
    verdict = admission.check(INVITE, host, 0.0)
    assert isinstance(verdict, Refused) and verdict.status == 403
    assert host in verdict.reason
    assert admission.counters["untrusted"] == 1


def test_v4_mapped_v6_source_is_judged_as_its_v4_address() -> None:
    admission = Admission(settings(trusted_networks=["10.0.0.0/8"]))
    assert admission.check(INVITE, "::ffff:10.0.0.1", 0.0) is ADMITTED
    assert isinstance(admission.check(INVITE, "::ffff:11.0.0.1", 0.0), Refused)


def test_a_v6_network_does_not_admit_v4_addresses() -> None:
    networks = parse_networks(["::/0"])
    assert address_in("2001:db8::1", networks)
    assert not address_in("10.0.0.1", networks)


def test_untrusted_ack_and_response_are_dropped_unanswered() -> None:
    admission = Admission(settings(trusted_networks=["127.0.0.0/29"]))
    assert admission.check(ACK, "127.0.0.9", 0.0) == Dropped("untrusted_dropped")
    assert admission.check(RESPONSE, "127.0.0.9", 0.0) == Dropped("untrusted_dropped")
    assert admission.check(RESPONSE, "127.0.0.1", 0.0) is ADMITTED
    assert admission.counters == {"untrusted_dropped": 2}


def test_untrusted_answers_are_bounded_per_source() -> None:
    admission = Admission(settings(trusted_networks=["127.0.0.0/29"]))
    verdicts = [admission.check(INVITE, "127.0.0.9", 0.0) for _ in range(50)]
    answered = sum(isinstance(v, Refused) for v in verdicts)
    assert answered == int(ANSWER_RATE)
    assert admission.counters["untrusted_dropped"] == 50 - answered
    # another untrusted source has an allowance of its own, and it refills
    assert isinstance(admission.check(INVITE, "127.0.0.10", 0.0), Refused)
    assert isinstance(admission.check(INVITE, "127.0.0.9", 1.0), Refused)


def test_verdict_is_cached_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.admission as module

    calls: list[str] = []
    real = module.address_in

    def counting(host: str, networks: object) -> bool:
        calls.append(host)
        return real(host, networks)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "address_in", counting)
    admission = Admission(Settings())
    for i in range(100):
        admission.check(INVITE, "10.0.0.%d" % (i % 3), float(i))
    assert sorted(calls) == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]


def test_sources_are_an_lru_of_bounded_size() -> None:
    admission = Admission(settings(rate=1.0, burst=1), max_sources=3)
    assert admission.check(INVITE, "10.0.0.1", 0.0) is ADMITTED
    assert isinstance(admission.check(INVITE, "10.0.0.1", 0.0), Dropped)  # bucket empty
    for host in ("10.0.0.2", "10.0.0.3"):
        admission.check(INVITE, host, 0.0)
    admission.check(ACK, "10.0.0.1", 0.0)  # used again: the most recent
    admission.check(INVITE, "10.0.0.4", 0.0)  # evicts 10.0.0.2, the least recent
    assert len(admission) == 3
    assert isinstance(admission.check(INVITE, "10.0.0.1", 0.0), Dropped)  # still remembered
    assert admission.check(INVITE, "10.0.0.2", 0.0) is ADMITTED  # forgotten: a full bucket


# --- certificate names -----------------------------------------------------------
def test_tls_names_must_be_allowed_when_a_list_is_set() -> None:
    admission = Admission(settings_tls(["fe1.contoso.com"]))
    fe1 = ("fe1.contoso.com",)
    assert admission.check(INVITE, "10.0.0.1", 0.0, stream=True, names=fe1) is ADMITTED
    verdict = admission.check(INVITE, "10.0.0.1", 0.0, stream=True, names=("fe2.contoso.com",))
    assert isinstance(verdict, Refused) and verdict.status == 403
    verdict = admission.check(INVITE, "10.0.0.1", 0.0, stream=True, names=())
    assert isinstance(verdict, Refused)
    assert admission.counters["untrusted_name"] == 2
    # plain TCP and UDP carry no names and are judged by address alone
    assert admission.check(INVITE, "10.0.0.1", 0.0, stream=True) is ADMITTED


def test_empty_name_list_admits_any_verified_certificate() -> None:
    admission = Admission(settings_tls([]))
    assert admission.check(INVITE, "10.0.0.1", 0.0, stream=True, names=("x.example",)) is ADMITTED


# --- rate ----------------------------------------------------------------------
def test_bucket_allows_burst_then_refills_at_rate() -> None:
    admission = Admission(settings(rate=10.0, burst=5))
    assert all(admission.check(INVITE, "10.0.0.1", 0.0) is ADMITTED for _ in range(5))
    assert admission.check(INVITE, "10.0.0.1", 0.0) == Dropped("rate_limited_dropped")
    assert admission.check(INVITE, "10.0.0.1", 0.05) == Dropped("rate_limited_dropped")
    assert admission.check(INVITE, "10.0.0.1", 0.1) is ADMITTED  # one token after 1/rate s
    assert admission.check(INVITE, "10.0.0.1", 0.1) == Dropped("rate_limited_dropped")
    # a long pause refills to the burst, not beyond
    admitted = [admission.check(INVITE, "10.0.0.1", 100.0) is ADMITTED for _ in range(10)]
    assert admitted.count(True) == 5
    assert admission.counters["rate_limited_dropped"] == 8


def test_other_sources_are_not_limited_by_one_source_flood() -> None:
    admission = Admission(settings(rate=1.0, burst=2))
    for _ in range(1000):
        admission.check(INVITE, "10.0.0.1", 0.0)
    assert admission.check(INVITE, "10.0.0.2", 0.0) is ADMITTED


def test_ack_and_cancel_are_not_starved_by_the_same_source_invites() -> None:
    admission = Admission(settings(rate=1.0, burst=2))
    for _ in range(10):
        admission.check(INVITE, "10.0.0.1", 0.0)
    assert admission.check(ACK, "10.0.0.1", 0.0) is ADMITTED
    assert admission.check(CANCEL, "10.0.0.1", 0.0) is ADMITTED
    assert admission.check(ACK, "10.0.0.1", 0.0) == Dropped("rate_limited_dropped")


def test_responses_are_never_rate_limited() -> None:
    admission = Admission(settings(rate=1.0, burst=1))
    assert all(admission.check(RESPONSE, "10.0.0.1", 0.0) is ADMITTED for _ in range(10))


def test_over_the_rate_a_stream_gets_few_503_with_retry_after_udp_none() -> None:
    admission = Admission(settings(rate=0.5, burst=1))
    admission.check(INVITE, "10.0.0.1", 0.0, stream=True)
    verdicts = [admission.check(INVITE, "10.0.0.1", 0.0, stream=True) for _ in range(20)]
    refused = [v for v in verdicts if isinstance(v, Refused)]
    assert len(refused) == int(ANSWER_RATE)
    assert all(v.status == 503 and v.retry_after == 2 for v in refused)
    assert admission.counters["rate_limited_answered"] == int(ANSWER_RATE)
    assert admission.counters["rate_limited_dropped"] == 20 - int(ANSWER_RATE)
    admission.check(INVITE, "10.0.0.2", 0.0)
    assert admission.check(INVITE, "10.0.0.2", 0.0) == Dropped("rate_limited_dropped")


def test_rate_zero_means_no_limit() -> None:
    admission = Admission(settings(rate=0.0, burst=1))
    assert all(admission.check(INVITE, "10.0.0.1", 0.0) is ADMITTED for _ in range(100))


# --- reload ----------------------------------------------------------------------
def test_configure_swaps_networks_and_limits_keeping_buckets() -> None:
    admission = Admission(settings(rate=1.0, burst=1))
    assert admission.check(INVITE, "10.0.0.1", 0.0) is ADMITTED
    assert isinstance(admission.check(INVITE, "10.0.0.1", 0.0), Dropped)
    admission.configure(settings(trusted_networks=["192.168.0.0/16"], rate=1.0, burst=1))
    verdict = admission.check(INVITE, "10.0.0.1", 5.0)  # cached verdict recomputed
    assert isinstance(verdict, Refused) and verdict.status == 403
    assert admission.check(INVITE, "192.168.1.1", 5.0) is ADMITTED
    admission.configure(settings(rate=100.0, burst=50))
    assert admission.check(INVITE, "10.0.0.1", 5.0) is ADMITTED  # the kept bucket, refilled
    assert sum(admission.check(INVITE, "10.0.0.2", 5.0) is ADMITTED for _ in range(60)) == 50
    admission.configure(settings_tls(["fe1.contoso.com"]))
    assert isinstance(
        admission.check(INVITE, "10.0.0.3", 6.0, stream=True, names=("fe2.contoso.com",)),
        Refused,
    )


# --- the element's answer -----------------------------------------------------------
def test_element_refuses_with_403_and_ms_diagnostics() -> None:
    element = make_element()
    out = element.refuse(INVITE, UDP_PEER, 403, "source 127.0.0.9 untrusted", 0.0)
    assert len(out) == 1 and out[0].peer == UDP_PEER
    assert status_of(out[0].data) == 403
    assert header(out[0].data, "ms-diagnostics").startswith(b"%d;" % DIAG_UNTRUSTED)
    assert not element.transactions  # stateless: nothing is remembered


def test_element_refuses_with_503_and_retry_after_on_the_connection() -> None:
    element = make_element()
    out = element.refuse(INVITE, TCP_PEER, 503, "busy", 0.0, retry_after=3)
    assert len(out) == 1 and out[0].peer == TCP_PEER
    assert status_of(out[0].data) == 503
    assert header(out[0].data, "retry-after") == b"3"
    assert header(out[0].data, "ms-diagnostics").startswith(b"%d;" % DIAG_RATE_LIMITED)


@pytest.mark.parametrize("data", [ACK, RESPONSE, b"garbage\r\n\r\n", b"\r\n\r\n"])
def test_element_answers_nothing_to_ack_responses_or_garbage(data: bytes) -> None:
    assert make_element().refuse(data, Peer("udp", "127.0.0.9", 5060), 403, "x", 0.0) == []


# --- any input ---------------------------------------------------------------------------
@hypothesis_settings(deadline=None)
@given(
    data=st.binary(max_size=64),
    host=st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
    now=st.floats(min_value=0.0, max_value=1e9),
    stream=st.booleans(),
    names=st.one_of(st.none(), st.lists(st.text(max_size=10), max_size=3).map(tuple)),
)
def test_any_message_from_any_source_gets_a_verdict(
    data: bytes, host: str, now: float, stream: bool, names: tuple[str, ...] | None
) -> None:
    admission = Admission(settings_tls(["fe1.contoso.com"], rate=1.0, burst=1))
    for _ in range(3):
        verdict = admission.check(data, host, now, stream=stream, names=names)
        assert verdict is ADMITTED or isinstance(verdict, Refused | Dropped)
        if isinstance(verdict, Refused):
            assert verdict.status in (403, 503)
            out = make_element().refuse(data, Peer("udp", "127.0.0.1", 5060), 403, "x", now)
            assert all(status_of(s.data) == 403 for s in out)
