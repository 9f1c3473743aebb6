"""The redirect element driven with bytes and a fake clock (RFC 3261 §8.2, §17.2, §18.2.2)."""

from __future__ import annotations

import pytest

from proxy.element import Element
from proxy.sip.message import Request, Response, parse
from proxy.sip.peer import Peer, Send

from .sipmsg import (
    CHAT_URI,
    TCP_PEER,
    TIMERS,
    UDP_PEER,
    ack_for,
    cancel_for,
    endpoint,
    header,
    header_line,
    headers,
    make_element,
    request,
    sends,
    status_of,
    to_tag,
)

T1 = TIMERS.t1


def one(sends: list[Send]) -> bytes:
    """The data of the only Send."""
    assert len(sends) == 1, sends
    return sends[0].data


def answer(element: Element, data: bytes, peer: Peer = UDP_PEER, now: float = 0.0) -> bytes:
    return one(sends(element.receive(data, peer, now)))


# redirects -------------------------------------------------------------------------
def test_invite_to_the_chat_uri_is_redirected_to_the_pool() -> None:
    element = make_element()
    resp = answer(element, request())
    assert status_of(resp) == 302
    assert header(resp, "Contact") == b"<sip:ocschat@pcpool.contoso.com>"
    assert element.counters["redirects"] == 1


@pytest.mark.parametrize(
    ("port", "transport", "contact"),
    [
        (5041, "tls", b"<sip:ocschat@pcpool.contoso.com:5041;transport=tls>"),
        (5041, None, b"<sip:ocschat@pcpool.contoso.com:5041>"),
        (None, "tcp", b"<sip:ocschat@pcpool.contoso.com;transport=tcp>"),
    ],
)
def test_contact_carries_the_pool_port_and_transport_when_set(
    port: int | None, transport: str | None, contact: bytes
) -> None:
    element = make_element(endpoint(pool_port=port, pool_transport=transport))
    assert header(answer(element, request()), "Contact") == contact


def test_redirect_adds_a_to_tag_and_copies_the_rest_of_to() -> None:
    resp = answer(make_element(), request(to="<sip:ocschat@contoso.com>"))
    tag = to_tag(resp)
    assert tag
    assert header(resp, "To") == b"<sip:ocschat@contoso.com>;tag=" + tag


def test_to_tags_differ_between_transactions() -> None:
    element = make_element()
    first = answer(element, request(branch="z9hG4bK-a"))
    second = answer(element, request(branch="z9hG4bK-b"))
    assert to_tag(first) != to_tag(second)


def test_request_uri_is_matched_without_case_escapes_port_or_params() -> None:
    element = make_element()
    for n, uri in enumerate(["sip:OCSChat@Contoso.com", "sip:%6fcschat@contoso.com:5061;lr"]):
        resp = answer(element, request(uri=uri, branch="z9hG4bK-%d" % n))
        assert status_of(resp) == 302


def test_to_header_is_not_what_is_routed() -> None:
    """RFC 3261 §16.5: the Request-URI names the target."""
    resp = answer(make_element(), request(uri="sip:other@contoso.com", to="<%s>" % CHAT_URI))
    assert status_of(resp) == 404


@pytest.mark.parametrize("method", ["SUBSCRIBE", "MESSAGE", "INFO", "FOOBAR"])
def test_other_methods_to_the_chat_uri_are_redirected(method: str) -> None:
    resp = answer(make_element(), request(method))
    assert status_of(resp) == 302
    assert header(resp, "CSeq") == b"1 " + method.encode()


def test_unknown_uri_is_404_naming_it_in_ms_diagnostics() -> None:
    element = make_element()
    resp = answer(element, request(uri="sip:nobody@contoso.com"))
    assert status_of(resp) == 404
    diag = header(resp, "ms-diagnostics")
    assert diag.startswith(b"52001;") and b"nobody@contoso.com" in diag
    assert element.counters["not_found"] == 1
    assert element.counters["redirects"] == 0


def test_ms_diagnostics_show_a_hostile_uri_as_printable_ascii() -> None:
    """A decoded user part with CR LF or non-Latin-1 characters must neither end
    the header nor break the encoding of the response."""
    element = make_element()
    for n, user in enumerate(["%0D%0AX-Injected:%20yes", "%E2%82%AC", "%22%5C"]):
        uri = "sip:%s@contoso.com" % user
        resp = answer(element, request(uri=uri, branch="z9hG4bK-h%d" % n))
        assert status_of(resp) == 404
        assert not headers(resp, "X-Injected")
        diag = header(resp, "ms-diagnostics")
        assert diag.isascii() and b"\r" not in diag
        assert isinstance(parse(resp), Response)


# the UAS core's checks ----------------------------------------------------------------
def test_options_to_the_server_itself_is_200_with_capabilities() -> None:
    """RFC 3261 §11.2."""
    resp = answer(make_element(), request("OPTIONS", "sip:127.0.0.1:5060", to="<sip:127.0.0.1>"))
    assert status_of(resp) == 200
    assert b"INVITE" in header(resp, "Allow") and b"OPTIONS" in header(resp, "Allow")
    assert header(resp, "Accept") == b"application/sdp"
    assert headers(resp, "Supported") == [b""]


def test_max_forwards_zero_is_483() -> None:
    resp = answer(make_element(), request(max_forwards=0))
    assert status_of(resp) == 483


def test_options_to_the_server_with_max_forwards_zero_is_200() -> None:
    """RFC 3261 §16.3 item 3: an OPTIONS for the element itself is answered."""
    resp = answer(make_element(), request("OPTIONS", "sip:127.0.0.1:5060", max_forwards=0))
    assert status_of(resp) == 200


def test_options_to_the_chat_uri_with_max_forwards_zero_is_483() -> None:
    resp = answer(make_element(), request("OPTIONS", max_forwards=0))
    assert status_of(resp) == 483


@pytest.mark.parametrize("uri", ["tel:+12015550123", "http://contoso.com/chat", "im:a@b.com"])
def test_request_uri_of_another_scheme_is_416(uri: str) -> None:
    resp = answer(make_element(), request(uri=uri, to="<sip:ocschat@contoso.com>"))
    assert status_of(resp) == 416


def test_malformed_request_uri_is_400() -> None:
    resp = answer(make_element(), request(uri="sip:ocschat@contoso..com"))
    assert status_of(resp) == 400


def test_unknown_required_extension_is_420_listing_it() -> None:
    """RFC 3261 §8.2.2.3."""
    element = make_element()
    resp = answer(element, request(extra=("Require: foo", "Require: bar, baz")))
    assert status_of(resp) == 420
    assert header(resp, "Unsupported") == b"foo, bar, baz"
    assert element.counters["redirects"] == 0


def test_register_is_405_with_allow() -> None:
    """RFC 3261 §10.3: this element is not a registrar."""
    resp = answer(make_element(), request("REGISTER", "sip:contoso.com"))
    assert status_of(resp) == 405
    assert b"INVITE" in header(resp, "Allow")
    assert header(resp, "ms-diagnostics").startswith(b"52002;")


def test_request_with_a_to_tag_is_481() -> None:
    """RFC 3261 §12.2.2: the element holds no dialogs."""
    resp = answer(make_element(), request(to="<%s>;tag=dialog1" % CHAT_URI))
    assert status_of(resp) == 481
    assert header(resp, "To") == b"<sip:ocschat@contoso.com>;tag=dialog1"


def test_sip_3_request_is_505() -> None:
    resp = answer(make_element(), request(version="SIP/3.0"))
    assert status_of(resp) == 505


def test_garbage_without_a_via_is_dropped_and_counted() -> None:
    element = make_element()
    assert sends(element.receive(b"\x00\x01garbage\r\n\r\n", UDP_PEER, 0.0)) == []
    assert (
        sends(element.receive(b"INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>\r\n\r\n", UDP_PEER, 0.0))
        == []
    )
    assert element.counters["malformed_dropped"] == 2
    assert element.transactions == {}


def test_malformed_request_with_a_via_is_400() -> None:
    element = make_element()
    resp = answer(element, request(cseq_method="BYE"))
    assert status_of(resp) == 400
    assert header(resp, "ms-diagnostics").startswith(b"52004;")
    assert element.counters["malformed_answered"] == 1
    assert element.transactions == {}


def test_request_refused_while_being_answered_leaves_no_transaction() -> None:
    """A header only the UAS core reads (Require) is malformed: 400, and no
    transaction may be left waiting for a response that was never sent."""
    element = make_element()
    resp = answer(element, request(extra=("Require: not a token",)))
    assert status_of(resp) == 400
    assert element.transactions == {}
    assert element.in_flight() == 0
    assert element.next_deadline() is None


def test_via_with_unparsable_params_still_gets_400_at_its_sent_by() -> None:
    """RFC 4475 §3.1.2.1 (badinv01)."""
    data = request(via="SIP/2.0/UDP 192.0.2.15:5070;;,;,,")
    (send,) = sends(make_element().receive(data, Peer("udp", "192.0.2.15", 40000), 0.0))
    assert status_of(send.data) == 400
    assert send.peer == Peer("udp", "192.0.2.15", 5070)


def test_malformed_ack_is_never_answered() -> None:
    element = make_element()
    assert sends(element.receive(request("ACK", cseq_method="INVITE"), UDP_PEER, 0.0)) == []
    assert element.counters["malformed_dropped"] == 1


def test_responses_are_absorbed() -> None:
    element = make_element()
    data = b"SIP/2.0 200 OK\r\n" + request()[request().index(b"\r\n") + 2 :]
    assert sends(element.receive(data, UDP_PEER, 0.0)) == []
    assert element.counters["responses_absorbed"] == 1


def test_blank_datagram_is_a_keep_alive() -> None:
    element = make_element()
    assert sends(element.receive(b"\r\n\r\n", UDP_PEER, 0.0)) == []
    assert element.counters == {}


# the INVITE server transaction ------------------------------------------------------
def test_retransmitted_invite_gets_the_same_302_without_being_processed_again() -> None:
    element = make_element()
    first = answer(element, request(), now=0.0)
    again = answer(element, request(), now=0.1)
    assert again == first
    assert element.counters["redirects"] == 1
    assert element.counters["retransmissions"] == 1


def test_302_over_udp_is_retransmitted_at_t1_and_3t1_until_the_ack() -> None:
    element = make_element()
    invite = request()
    resp = answer(element, invite, now=0.0)
    assert element.next_deadline() == T1
    assert sends(element.handle_timers(T1 - 0.01)) == []
    assert [s.data for s in sends(element.handle_timers(T1))] == [resp]
    assert element.next_deadline() == 3 * T1
    assert [s.data for s in sends(element.handle_timers(3 * T1))] == [resp]
    assert element.in_flight() == 1

    assert sends(element.receive(ack_for(invite, resp), UDP_PEER, 3 * T1 + 0.1)) == []
    assert element.in_flight() == 0
    assert sends(element.handle_timers(7 * T1)) == []
    assert sends(element.handle_timers(100.0)) == []
    assert element.transactions == {}
    assert element.next_deadline() is None


def test_earliest_armed_reports_only_timers_armed_since_it_was_last_asked() -> None:
    element = make_element()
    assert element.earliest_armed() is None
    invite = request()
    resp = answer(element, invite, now=0.0)
    assert element.earliest_armed() == T1  # G before H
    assert element.earliest_armed() is None  # nothing new since
    answer(element, request(branch="z9hG4bK-other"), now=1.0)
    assert element.earliest_armed() == 1.0 + T1
    sends(element.receive(ack_for(invite, resp), UDP_PEER, 2.0))
    assert element.earliest_armed() == 2.0 + TIMERS.t4  # Timer I
    answer(element, request(branch="z9hG4bK-third"), now=3.0)
    assert element.next_deadline() == 1.0 + T1
    assert element.earliest_armed() is None  # next_deadline() saw everything


def test_302_without_ack_is_given_up_at_timer_h() -> None:
    element = make_element()
    resp = answer(element, request(), now=0.0)
    sent = []
    now = 0.0
    while (deadline := element.next_deadline()) is not None:
        assert deadline > now
        now = deadline
        sent += sends(element.handle_timers(now))
    assert now == 64 * T1
    assert all(s.data == resp for s in sent)
    assert len(sent) == 10  # 0.5, 1.5, 3.5, 7.5, then every T2 up to 31.5
    assert element.transactions == {}


def test_ack_taking_the_full_parse_path_is_absorbed_too() -> None:
    """An ACK whose Via the quick matcher does not read still finds its INVITE."""
    element = make_element()
    invite = request(via="SIP/2.0/UDP 127.0.0.1:5060 ;branch=z9hG4bK-slow")
    resp = answer(element, invite)
    assert sends(element.receive(ack_for(invite, resp), UDP_PEER, 0.1)) == []
    assert element.in_flight() == 0
    assert sends(element.handle_timers(T1)) == []


def test_ack_for_an_unknown_transaction_is_absorbed_silently() -> None:
    element = make_element()
    ack = request("ACK", to="<%s>;tag=x" % CHAT_URI)
    assert sends(element.receive(ack, UDP_PEER, 0.0)) == []
    assert element.counters["ack_absorbed"] == 1


def test_302_over_tcp_is_not_retransmitted_and_the_ack_ends_it() -> None:
    element = make_element()
    invite = request(via="SIP/2.0/TCP 127.0.0.1:50123;branch=z9hG4bK-t")
    sent = sends(element.receive(invite, TCP_PEER, 0.0))
    assert [s.peer for s in sent] == [TCP_PEER]
    assert element.next_deadline() == 64 * T1
    assert sends(element.handle_timers(10.0)) == []
    assert sends(element.receive(ack_for(invite, sent[0].data), TCP_PEER, 1.0)) == []
    assert element.transactions == {}
    assert element.next_deadline() is None


def test_retransmitted_options_gets_the_same_response_until_timer_j() -> None:
    element = make_element()
    options = request("OPTIONS")
    first = answer(element, options, now=0.0)
    assert answer(element, options, now=1.0) == first
    assert element.next_deadline() == 64 * T1
    assert sends(element.handle_timers(64 * T1)) == []
    assert element.transactions == {}
    assert element.counters["redirects"] == 1


# CANCEL (§9.2) ----------------------------------------------------------------------------
def test_cancel_for_an_existing_invite_is_200() -> None:
    element = make_element()
    invite = request()
    answer(element, invite)
    resp = answer(element, cancel_for(invite))
    assert status_of(resp) == 200
    assert header(resp, "CSeq") == b"1 CANCEL"


def test_cancel_for_an_unknown_invite_is_481() -> None:
    element = make_element()
    answer(element, request(branch="z9hG4bK-other"))
    assert status_of(answer(element, cancel_for(request()))) == 481


def test_cancel_matches_an_rfc2543_invite() -> None:
    element = make_element()
    invite = request(via="SIP/2.0/UDP 127.0.0.1:5060")
    answer(element, invite)
    assert status_of(answer(element, cancel_for(invite))) == 200


# where responses go (§18.2.2, RFC 3581) -----------------------------------------------------
def test_rport_sends_to_the_source_port_and_fills_rport_and_received() -> None:
    source = Peer("udp", "192.0.2.7", 40000, listener=3)
    data = request(via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-r;rport")
    (send,) = sends(make_element().receive(data, source, 0.0))
    assert send.peer == source
    assert header_line(send.data, "Via") == (
        b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-r;rport=40000;received=192.0.2.7"
    )


def test_rport_from_the_sent_by_address_still_gets_received() -> None:
    """RFC 3581 §4: with rport the server adds received even if it matches."""
    source = Peer("udp", "192.0.2.7", 40000)
    data = request(via="SIP/2.0/UDP 192.0.2.7:5060;rport;branch=z9hG4bK-r")
    (send,) = sends(make_element().receive(data, source, 0.0))
    assert send.peer == source
    assert header(send.data, "Via") == (
        b"SIP/2.0/UDP 192.0.2.7:5060;rport=40000;branch=z9hG4bK-r;received=192.0.2.7"
    )


def test_without_rport_a_foreign_sent_by_gets_received_and_its_port() -> None:
    source = Peer("udp", "192.0.2.7", 40000, listener=3)
    data = request(via="SIP/2.0/UDP client.contoso.com:5070;branch=z9hG4bK-n")
    (send,) = sends(make_element().receive(data, source, 0.0))
    assert send.peer == Peer("udp", "192.0.2.7", 5070, listener=3)
    assert header(send.data, "Via") == (
        b"SIP/2.0/UDP client.contoso.com:5070;branch=z9hG4bK-n;received=192.0.2.7"
    )


def test_without_rport_a_matching_sent_by_is_left_alone_and_5060_is_the_default() -> None:
    source = Peer("udp", "192.0.2.7", 40000)
    data = request(via="SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-n")
    (send,) = sends(make_element().receive(data, source, 0.0))
    assert send.peer == Peer("udp", "192.0.2.7", 5060)
    assert header(send.data, "Via") == b"SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK-n"


def test_only_the_top_via_is_changed() -> None:
    source = Peer("udp", "192.0.2.7", 40000)
    data = request(
        via="SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-a;rport, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-b",
        extra=("Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK-c",),
    )
    (send,) = sends(make_element().receive(data, source, 0.0))
    assert headers(send.data, "Via") == [
        b"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-a;rport=40000;received=192.0.2.7, "
        b"SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-b",
        b"SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK-c",
    ]


def test_maddr_sends_to_that_address() -> None:
    data = request(via="SIP/2.0/UDP 10.0.0.1:5070;maddr=239.255.255.1;branch=z9hG4bK-m")
    (send,) = sends(make_element().receive(data, Peer("udp", "192.0.2.7", 40000), 0.0))
    assert send.peer == Peer("udp", "239.255.255.1", 5070)


def test_tcp_response_goes_back_on_the_same_connection() -> None:
    data = request(via="SIP/2.0/TCP client.contoso.com:5070;branch=z9hG4bK-t")
    (send,) = sends(make_element().receive(data, TCP_PEER, 0.0))
    assert send.peer is TCP_PEER


# draining and accounting -------------------------------------------------------------
def test_draining_refuses_new_invites_with_503_and_retry_after() -> None:
    element = make_element()
    element.draining = True
    resp = answer(element, request())
    assert status_of(resp) == 503
    assert header(resp, "Retry-After").isdigit()
    assert element.counters["redirects"] == 0


def test_draining_still_answers_cancel_and_absorbs_acks() -> None:
    element = make_element()
    invite = request()
    resp = answer(element, invite)
    element.draining = True
    assert status_of(answer(element, cancel_for(invite))) == 200
    assert sends(element.receive(ack_for(invite, resp), UDP_PEER, 0.2)) == []
    assert element.in_flight() == 0


def test_in_flight_counts_invites_waiting_for_their_ack() -> None:
    element = make_element()
    invites = [request(branch="z9hG4bK-f%d" % n) for n in range(3)]
    responses = [answer(element, inv) for inv in invites]
    answer(element, request("OPTIONS", branch="z9hG4bK-o"))
    assert element.in_flight() == 3
    sends(element.receive(ack_for(invites[0], responses[0]), UDP_PEER, 0.1))
    assert element.in_flight() == 2


def test_counters_count_requests_and_responses() -> None:
    element = make_element()
    answer(element, request())
    answer(element, request("OPTIONS", "sip:nobody@contoso.com", branch="z9hG4bK-2"))
    assert element.counters["requests.INVITE"] == 1
    assert element.counters["requests.OPTIONS"] == 1
    assert element.counters["responses.302"] == 1
    assert element.counters["responses.404"] == 1


def test_every_response_is_well_formed_and_echoes_the_request() -> None:
    element = make_element()
    for n, data in enumerate(
        [
            request(branch="z9hG4bK-w0"),
            request(uri="sip:nobody@contoso.com", branch="z9hG4bK-w1"),
            request("REGISTER", "sip:contoso.com", branch="z9hG4bK-w2"),
            request(extra=("Require: foo",), branch="z9hG4bK-w3"),
            request(max_forwards=0, branch="z9hG4bK-w4"),
        ]
    ):
        req = parse(data)
        resp = parse(answer(element, data, now=float(n)))
        assert isinstance(req, Request) and isinstance(resp, Response)
        assert resp.get("call-id") == req.get("call-id")
        assert resp.get("cseq") == req.get("cseq")
        assert resp.from_addr == req.from_addr


def test_draining_answers_options_to_pcproxy_itself_503_with_retry_after() -> None:
    """RFC 3261 §21.5.4: while draining, pcproxy is unavailable even to a
    keep-alive OPTIONS, so a Front End stops sending it new work."""
    element = make_element()
    options = request("OPTIONS", "sip:127.0.0.1:5060", to="<sip:127.0.0.1>")
    assert status_of(answer(element, options)) == 200
    element.draining = True
    resp = answer(element, request("OPTIONS", "sip:127.0.0.1:5060", branch="z9hG4bK-d"))
    assert status_of(resp) == 503
    assert header(resp, "Retry-After") == b"5"


def test_redirects_are_counted_per_endpoint() -> None:
    other = endpoint("sip:legacychat@contoso.com", "pcpool2.contoso.com")
    element = make_element(endpoint(), other)
    answer(element, request(branch="z9hG4bK-e1"))
    answer(element, request(uri="sip:legacychat@contoso.com", branch="z9hG4bK-e2"))
    answer(element, request(uri="sip:LegacyChat@contoso.com", branch="z9hG4bK-e3"))
    assert element.counters["redirect_by.sip:ocschat@contoso.com"] == 1
    assert element.counters["redirect_by.sip:legacychat@contoso.com"] == 2
