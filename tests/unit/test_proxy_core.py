"""The RFC 3261 §16 proxy rules: byte fidelity as properties, each rule as a unit test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sip.errors import SipError
from proxy.sip.headers import MAGIC_COOKIE, NameAddr, Via, split_commas
from proxy.sip.message import Request, line_value, parse
from proxy.sip.proxy_core import (
    BadExtension,
    LoopDetected,
    TooManyHops,
    UnsupportedUriScheme,
    _drop_first_value,
    _drop_last_value,
    branch_for,
    choose_best,
    forward_request,
    loop_part,
    make_cancel,
    preprocess_route,
    process_response,
    stateless_unique,
    validate_request,
)

SECRET = b"test-secret"
ME = "pcproxy.contoso.com"
MY_VIA = "SIP/2.0/TLS pcproxy.contoso.com:5061;branch=z9hG4bKours.1"
MY_RR = "<sip:pcproxy.contoso.com:5061;transport=tls;lr>"
POOL_URI = "sip:ocschat@pcpool.contoso.com:5041;transport=tls"


def is_mine(uri: str) -> bool:
    return "@" not in uri.split(";")[0] and ME in uri


def is_my_via(via: Via) -> bool:
    return via.host == ME


def req_of(data: bytes) -> Request:
    msg = parse(data)
    assert isinstance(msg, Request)
    return msg


def invite(*extra: str, uri: str = "sip:ocschat@contoso.com", body: bytes = b"") -> bytes:
    lines = [
        "INVITE %s SIP/2.0" % uri,
        "Via: SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1",
        "Via: SIP/2.0/TLS 10.0.0.5:49152;branch=z9hG4bKcl1;ms-received-port=49152",
        "Max-Forwards: 69",
        'From: "Alice" <sip:alice@contoso.com>;tag=a1;epid=01010101',
        "To: <sip:ocschat@contoso.com>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
        *extra,
        "Content-Length: %d" % len(body),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def lines_of(data: bytes) -> list[str]:
    return data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")


# generated Group Chat INVITEs -------------------------------------------------------
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
HEX = st.text("0123456789abcdef", min_size=8, max_size=16)
SPACE = st.sampled_from(["", " ", "  ", "\t", " \t "])


def _name(draw: st.DrawFn, long: str, compact: str | None = None) -> str:
    choices = [long, long.lower(), long.upper()]
    if compact is not None:
        choices.append(compact)
    return draw(st.sampled_from(choices))


def _fold(draw: st.DrawFn, value: str) -> str:
    """Fold a value at one of its ';' or ', ' (§7.3.1), or not."""
    cuts = [i for i, ch in enumerate(value) if ch in ";,"]
    if not cuts or not draw(st.booleans()):
        return value
    cut = draw(st.sampled_from(cuts)) + 1
    return value[:cut] + "\r\n" + draw(st.sampled_from([" ", "\t", "   "])) + value[cut:]


def _xccos(draw: st.DrawFn) -> bytes:
    chunk = '<msg id="%s" chanUri="ma-chan://contoso.com/%s"><body>hello</body></msg>\r\n'
    parts = [
        '<xccos ver="1" envid="%s" xmlns="urn:parlano:xml:ns:xccos">\r\n' % draw(HEX),
        '<cmd id="cmd:join" seqid="1"><data>\r\n',
    ]
    n = 0
    while sum(map(len, parts)) < 12 * 1024:
        parts.append(chunk % (n, draw(HEX)))
        n += 1
    parts.append("</data></cmd></xccos>\r\n")
    return "".join(parts).encode("latin-1")


def _sdp(draw: st.DrawFn) -> bytes:
    return (
        "v=0\r\no=- 0 0 IN IP4 10.0.0.5\r\ns=session\r\nc=IN IP4 10.0.0.5\r\n"
        "t=0 0\r\nm=message %d sip null\r\na=accept-types:text/plain\r\n"
        % draw(st.integers(1024, 65535))
    ).encode("latin-1")


@dataclass
class Generated:
    data: bytes
    uri: str
    max_forwards_line: str | None
    lines: list[str]


@st.composite
def group_chat_invites(draw: st.DrawFn) -> Generated:
    user, epid, tag, call_id = draw(TOKEN), draw(HEX), draw(HEX), draw(HEX)
    sp = draw(SPACE)
    headers: list[str] = []
    vias = [
        'SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bK%s;ms-internal-info="%s"'
        % (draw(HEX), draw(HEX)),
        "SIP/2.0/TLS 10.0.0.5:%d;branch=z9hG4bK%s;ms-received-port=%d;ms-received-cid=%s"
        % (draw(st.integers(1024, 65535)), draw(HEX), 5061, draw(HEX)),
    ]
    if draw(st.booleans()):
        headers.append("%s:%s%s, %s" % (_name(draw, "Via", "v"), sp, vias[0], vias[1]))
    else:
        headers += ["%s:%s%s" % (_name(draw, "Via", "v"), sp, _fold(draw, v)) for v in vias]
    mf_line = None
    if draw(st.booleans()):
        mf_line = "%s:%s%d" % (_name(draw, "Max-Forwards"), sp, draw(st.integers(1, 70)))
        headers.append(mf_line)
    headers += [
        "%s:%s%s"
        % (
            _name(draw, "From", "f"),
            sp,
            _fold(draw, '"User %s" <sip:%s@contoso.com>;tag=%s;epid=%s' % (user, user, tag, epid)),
        ),
        "%s: <sip:ocschat@contoso.com>" % _name(draw, "To", "t"),
        "%s:%s%s" % (_name(draw, "Call-ID", "i"), sp, call_id),
        "CSeq: %d INVITE" % draw(st.integers(1, 2**31 - 1)),
        "Contact: <sip:%s@contoso.com;opaque=user:epid:%s;gruu>" % (user, draw(HEX)),
        "%s: ms-sender" % _name(draw, "Supported", "k"),
        "Supported: ms-dialog-route-set-update, timer",
        "ms-keep-alive:%sUAC;hop-hop=yes" % sp,
        "Ms-Conversation-ID :%sAc%s==" % (sp, draw(HEX)),
        "ms-subnet: 10.0.0.0",
        "User-Agent: UCCAPI/4.0.7577.0 OC/4.0.7577.0 (Microsoft Office Communicator 2010)",
        _fold(
            draw,
            'Proxy-Authorization: TLS-DSK qop="auth", realm="SIP Communications Service", '
            'opaque="%s", targetname="fe.contoso.com", crand="%s", cnum="1", '
            'response="%s"' % (draw(HEX), draw(HEX), draw(HEX)),
        ),
        'Authorization: NTLM opaque="%s", crand="%s"' % (draw(HEX), draw(HEX)),
        "X-Unknown-Header:%s%s" % (sp, draw(TOKEN)),
    ]
    if draw(st.booleans()):
        headers.append("Record-Route: <sip:fe.contoso.com:5061;transport=tls;lr>")
    if draw(st.booleans()):
        headers.append("Route: <sip:pool-edge.contoso.com;lr>")
    headers = draw(st.permutations(headers))
    body = _xccos(draw) if draw(st.booleans()) else _sdp(draw)
    ctype = "text/plain" if body.startswith(b"<xccos") else "application/sdp"
    headers.append("%s: %s" % (_name(draw, "Content-Type", "c"), ctype))
    headers.append("%s:%s%d" % (_name(draw, "Content-Length", "l"), sp, len(body)))
    uri = "sip:ocschat@contoso.com"
    data = ("INVITE %s SIP/2.0\r\n%s\r\n\r\n" % (uri, "\r\n".join(headers))).encode("latin-1")
    return Generated(data + body, uri, mf_line, headers)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(group_chat_invites(), st.booleans(), st.booleans())
def test_forwarded_bytes_differ_only_where_16_6_allows(gen, record_route, retarget):
    req = req_of(gen.data)
    via_value = "SIP/2.0/TLS pcproxy.contoso.com:5061;branch=" + branch_for(req, SECRET)
    out = forward_request(
        req,
        target_uri=POOL_URI if retarget else None,
        via_value=via_value,
        record_route_value=MY_RR if record_route else None,
    )
    text = out.decode("latin-1")
    # the additions are where §16.6 puts them
    forwarded = req_of(out)
    assert forwarded.get_all("via")[0] == via_value
    assert forwarded.uri == (POOL_URI if retarget else gen.uri)
    if record_route:
        assert forwarded.get_all("record-route")[0] == MY_RR
    # undo exactly the allowed changes: what is left is the received bytes
    text = text.replace("\r\nVia: %s" % via_value, "", 1)
    if record_route:
        text = text.replace("\r\nRecord-Route: %s" % MY_RR, "", 1)
    if gen.max_forwards_line is None:
        assert text.count("\r\nMax-Forwards: 70\r\n") == 1
        text = text.replace("\r\nMax-Forwards: 70", "", 1)
    else:
        head, _, old = gen.max_forwards_line.rpartition(":")
        digits = old.lstrip(" \t")
        new = "%s:%s%d" % (head, old[: len(old) - len(digits)], int(digits) - 1)
        assert text.count("\r\n%s\r\n" % new) == 1
        text = text.replace("\r\n%s\r\n" % new, "\r\n%s\r\n" % gen.max_forwards_line, 1)
    if retarget:
        text = text.replace(POOL_URI, gen.uri, 1)
    assert text.encode("latin-1") == gen.data


@PROPERTY
@given(group_chat_invites())
def test_response_loses_exactly_our_via_line(gen):
    keep = [line for line in gen.lines if not line.lower().startswith(("max-forwards", "route"))]
    body = b"v=0\r\n"
    keep = [line for line in keep if not line.lower().startswith(("content-length", "l:"))]
    keep.append("Content-Length: %d" % len(body))
    head = "SIP/2.0 200 OK\r\n%s\r\n" % "\r\n".join(keep)
    ours = "Via: %s\r\n" % MY_VIA
    received = (head.replace("\r\n", "\r\n" + ours, 1) + "\r\n").encode("latin-1") + body
    expected = (head + "\r\n").encode("latin-1") + body
    assert process_response(received, "z9hG4bKours.1") == expected


# §16.3 --------------------------------------------------------------------------------
def test_max_forwards_zero_is_rejected_with_483():
    with pytest.raises(TooManyHops) as caught:
        validate_request(req_of(invite().replace(b"Max-Forwards: 69", b"Max-Forwards: 0")))
    assert caught.value.status == 483


def test_max_forwards_one_passes_and_absent_passes():
    validate_request(req_of(invite().replace(b"Max-Forwards: 69", b"Max-Forwards: 1")))
    validate_request(req_of(invite().replace(b"Max-Forwards: 69\r\n", b"")))


def test_non_sip_request_uri_is_rejected_with_416():
    with pytest.raises(UnsupportedUriScheme) as caught:
        validate_request(req_of(invite(uri="tel:+15551234")))
    assert caught.value.status == 416


def test_unsupported_proxy_require_is_rejected_with_420_and_unsupported():
    data = invite("Proxy-Require: ms-sender, foo", "Proxy-Require: bar")
    with pytest.raises(BadExtension) as caught:
        validate_request(req_of(data), supported={"ms-sender"})
    assert caught.value.status == 420
    assert [h.raw for h in caught.value.headers()] == ["Unsupported: foo, bar"]
    validate_request(req_of(invite("Proxy-Require: ms-sender")), supported={"ms-sender"})


def _forwarded_once(data: bytes) -> bytes:
    req = req_of(data)
    via = "SIP/2.0/TLS %s:5061;branch=%s" % (ME, branch_for(req, SECRET))
    return forward_request(req, target_uri=None, via_value=via)


def _came_back(forwarded: bytes) -> bytes:
    """The forwarded request as it returns after one more hop that adds its Via."""
    return forwarded.replace(
        b"\r\nVia: SIP/2.0/TLS %s" % ME.encode(),
        b"\r\nVia: SIP/2.0/TLS pool.contoso.com:5041;branch=z9hG4bKpool1"
        b"\r\nVia: SIP/2.0/TLS " + ME.encode(),
        1,
    )


def test_request_that_returns_unchanged_is_a_loop_482():
    back = req_of(_came_back(_forwarded_once(invite())))
    with pytest.raises(LoopDetected) as caught:
        validate_request(back, secret=SECRET, is_my_via=is_my_via)
    assert caught.value.status == 482


def test_request_that_returns_with_a_new_request_uri_is_a_spiral():
    back = _came_back(_forwarded_once(invite()))
    spiral = back.replace(b"INVITE sip:ocschat@contoso.com", b"INVITE sip:other@contoso.com", 1)
    validate_request(req_of(spiral), secret=SECRET, is_my_via=is_my_via)


def test_loop_check_needs_our_sent_by_and_our_secret():
    back = req_of(_came_back(_forwarded_once(invite())))
    validate_request(back, secret=SECRET, is_my_via=lambda via: False)
    validate_request(back, secret=b"another", is_my_via=is_my_via)


def test_loop_check_skips_a_malformed_via_of_another_hop():
    data = invite().replace(
        b"Via: SIP/2.0/TLS fe.contoso.com",
        b"Via: SIP/2.0/TLS edge.contoso.com;branch=z9hG4bKe1\r\nVia: SIP/2.0 fe.contoso.com",
    )
    req = req_of(data)
    with pytest.raises(SipError):
        Via.parse(req.get_all("via")[1])
    validate_request(req, secret=SECRET, is_my_via=is_my_via)


# §16.4 --------------------------------------------------------------------------------
def test_loose_route_naming_us_is_popped():
    data = invite("Route: <sip:%s:5061;lr>, <sip:next.contoso.com;lr>" % ME)
    out = preprocess_route(req_of(data), is_mine)
    assert out.raw_lines("route") == ["Route: <sip:next.contoso.com;lr>"]
    assert out.uri == "sip:ocschat@contoso.com"
    single = preprocess_route(req_of(invite("Route: <sip:%s;lr>" % ME)), is_mine)
    assert single.raw_lines("route") == []


def test_route_naming_someone_else_is_kept():
    data = invite("Route: <sip:next.contoso.com;lr>")
    assert preprocess_route(req_of(data), is_mine).raw_lines("route") == [
        "Route: <sip:next.contoso.com;lr>"
    ]


def test_request_uri_from_a_strict_router_is_restored_from_the_last_route():
    # §16.12.1.2: P2 gets "BYE sip:p2;lr" from strict P3 with the target last in Route
    data = invite(
        "Route: <sip:p1.example.com;lr>",
        "Route: <sip:caller@u1.example.com>",
        uri="sip:%s;lr" % ME,
    )
    out = preprocess_route(req_of(data), is_mine)
    assert out.uri == "sip:caller@u1.example.com"
    assert out.raw_lines("route") == ["Route: <sip:p1.example.com;lr>"]


def _reference_preprocess_route(req: Request, is_mine: Callable[[str], bool]) -> Request:
    """§16.4 as first written, on the whole request (kept to check the
    Route-line version against)."""
    lines, keys, uri = list(req.lines), list(req.keys), req.uri
    if is_mine(uri) and "route" in keys:
        last = len(keys) - 1 - keys[::-1].index("route")
        values = split_commas(line_value(lines[last]))
        uri = NameAddr.parse(values[-1]).uri
        if len(values) == 1:
            del lines[last], keys[last]
        else:
            lines[last] = _drop_last_value(lines[last])
    if "route" in keys:
        first = keys.index("route")
        values = split_commas(line_value(lines[first]))
        if is_mine(NameAddr.parse(values[0]).uri):
            if len(values) == 1:
                del lines[first], keys[first]
            else:
                lines[first] = _drop_first_value(lines[first])
    return req.derive(lines, keys, uri, via=req.via, max_forwards=req.max_forwards)


ROUTE_VALUES = [
    "<sip:%s;lr>" % ME,
    "<sip:%s:5061;transport=tls;lr>" % ME,
    "<sip:next.contoso.com;lr>",
    "<sip:p3.middle.com>",
    '"Quoted, Name" <sip:caller@u1.example.com>',
    "<sip:a@b.example;x=1,2>",
    "sip:bare.example.com;lr",
]


@settings(max_examples=300, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.sampled_from(ROUTE_VALUES), min_size=1, max_size=3), min_size=1, max_size=4
    ),
    between=st.booleans(),
    strict=st.booleans(),
    space=SPACE,
)
def test_the_route_lines_are_preprocessed_as_the_whole_request_was(
    groups: list[list[str]], between: bool, strict: bool, space: str
) -> None:
    """``preprocess_route`` works on the Route lines alone and puts them
    back in place: the same request as editing the whole one, whatever the
    Route lines, values per line, other lines between them and a strict
    router's Request-URI."""
    extra: list[str] = []
    for values in groups:
        extra.append("Route:%s%s" % (space, ", ".join(values)))
        if between:
            extra.append("X-Between: %d" % len(extra))
    uri = "sip:%s;lr" % ME if strict else "sip:ocschat@contoso.com"
    req = req_of(invite(*extra, uri=uri))
    try:
        expected = _reference_preprocess_route(req, is_mine)
    except SipError:
        with pytest.raises(SipError):
            preprocess_route(req, is_mine)
        return
    got = preprocess_route(req, is_mine)
    assert (got.uri, got.lines, got.keys) == (expected.uri, expected.lines, expected.keys)


# §16.6 --------------------------------------------------------------------------------
def test_strict_next_hop_gets_the_request_uri_and_the_target_goes_last():
    data = invite("Route: <sip:p3.middle.com>", "Route: <sip:p2.example.com;lr>")
    out = req_of(forward_request(req_of(data), target_uri=None, via_value=MY_VIA))
    assert out.uri == "sip:p3.middle.com"
    assert out.raw_lines("route") == [
        "Route: <sip:p2.example.com;lr>",
        "Route: <sip:ocschat@contoso.com>",
    ]


def test_loose_next_hop_leaves_route_and_request_uri_alone():
    data = invite("Route: <sip:p2.example.com;lr>")
    out = req_of(forward_request(req_of(data), target_uri=None, via_value=MY_VIA))
    assert out.uri == "sip:ocschat@contoso.com"
    assert out.raw_lines("route") == ["Route: <sip:p2.example.com;lr>"]


def test_record_route_goes_before_the_first_record_route():
    data = invite("Contact: <sip:a@b.c>", "Record-Route: <sip:fe.contoso.com;lr>")
    out = lines_of(
        forward_request(req_of(data), target_uri=None, via_value=MY_VIA, record_route_value=MY_RR)
    )
    at = out.index("Record-Route: %s" % MY_RR)
    assert out[at + 1] == "Record-Route: <sip:fe.contoso.com;lr>"
    assert out[at - 1] == "Contact: <sip:a@b.c>"


def test_record_route_without_others_goes_after_the_vias():
    out = lines_of(
        forward_request(
            req_of(invite()), target_uri=None, via_value=MY_VIA, record_route_value=MY_RR
        )
    )
    assert out[1:5] == [
        "Via: %s" % MY_VIA,
        "Via: SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1",
        "Via: SIP/2.0/TLS 10.0.0.5:49152;branch=z9hG4bKcl1;ms-received-port=49152",
        "Record-Route: %s" % MY_RR,
    ]


def test_max_forwards_is_decremented_in_place_or_added_as_70():
    out = lines_of(forward_request(req_of(invite()), target_uri=None, via_value=MY_VIA))
    assert out[4] == "Max-Forwards: 68"
    absent = invite().replace(b"Max-Forwards: 69\r\n", b"")
    assert "Max-Forwards: 70" in lines_of(
        forward_request(req_of(absent), target_uri=None, via_value=MY_VIA)
    )


def test_content_length_is_added_when_absent():
    data = invite().replace(b"\r\nContent-Length: 0", b"")
    out = forward_request(req_of(data), target_uri=None, via_value=MY_VIA)
    assert lines_of(out)[-1] == "Content-Length: 0"


def test_request_uri_replaced_by_target():
    out = forward_request(req_of(invite()), target_uri=POOL_URI, via_value=MY_VIA)
    assert out.startswith(("INVITE %s SIP/2.0\r\n" % POOL_URI).encode())


# §16.6 step 8, §16.11 -------------------------------------------------------------------
def test_branch_has_cookie_loop_part_and_a_unique_part():
    req = req_of(invite())
    one, two = branch_for(req, SECRET), branch_for(req, SECRET)
    assert one.startswith(MAGIC_COOKIE) and two.startswith(MAGIC_COOKIE)
    assert one != two
    assert one.split(".")[0] == two.split(".")[0] == MAGIC_COOKIE + loop_part(req, SECRET)
    assert branch_for(req, SECRET, unique="u1").endswith(".u1")


def test_loop_part_ignores_the_method_but_not_the_routing_fields():
    req = req_of(invite())
    base = loop_part(req, SECRET)
    cancel = req_of(make_cancel(invite()))
    assert loop_part(cancel, SECRET) == base
    changed = [
        invite().replace(b"Call-ID: c1", b"Call-ID: c2"),
        invite().replace(b"tag=a1", b"tag=a2"),
        invite().replace(b"CSeq: 1 INVITE", b"CSeq: 2 INVITE"),
        invite(uri="sip:other@contoso.com"),
        invite().replace(b"z9hG4bKfe1", b"z9hG4bKfe2"),
        invite("Route: <sip:x.contoso.com;lr>"),
        invite("Proxy-Require: foo"),
        invite("Proxy-Authorization: NTLM x"),
        invite().replace(b"To: <sip:ocschat@contoso.com>", b"To: <sip:ocschat@contoso.com>;tag=t"),
    ]
    for data in changed:
        assert loop_part(req_of(data), SECRET) != base, data


def test_stateless_unique_part_is_the_same_for_a_retransmission():
    assert stateless_unique(req_of(invite())) == stateless_unique(req_of(invite()))
    other = invite().replace(b"z9hG4bKfe1", b"z9hG4bKfe2")
    assert stateless_unique(req_of(other)) != stateless_unique(req_of(invite()))


# §16.7 --------------------------------------------------------------------------------
def _response(*vias: str) -> bytes:
    lines = ["SIP/2.0 180 Ringing", *("Via: %s" % v for v in vias)]
    lines += [
        'From: "Alice" <sip:alice@contoso.com>;tag=a1;epid=01010101',
        "To: <sip:ocschat@contoso.com>;tag=b2",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_response_with_someone_elses_top_via_is_discarded():
    data = _response("SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1", MY_VIA)
    assert process_response(data, "z9hG4bKours.1") is None


def test_response_with_only_our_via_is_for_us():
    assert process_response(_response(MY_VIA), "z9hG4bKours.1") is None


def test_our_value_is_cut_from_a_combined_via_line():
    rest = "SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1,\r\n SIP/2.0/TCP 10.0.0.5;rport"
    data = _response(MY_VIA + " ,  " + rest)
    out = process_response(data, "z9hG4bKours.1")
    assert out == _response(rest)


def test_malformed_response_raises_the_protocol_error():
    with pytest.raises(SipError):
        process_response(b"SIP/2.0 200 OK\r\n\r\n", "z9hG4bKours.1")


@pytest.mark.parametrize(
    ("finals", "best"),
    [
        ([], 408),
        ([180], 408),
        ([486, 603, 200], 603),
        ([404, 302, 500], 302),
        ([503, 407, 501, 404], 407),
        ([404, 484, 401], 401),
        ([486, 404], 486),
        ([503], 500),
        ([503, 502], 502),
        ([503, 604], 604),
    ],
)
def test_choose_best(finals, best):
    assert choose_best(finals) == best


# §9.1 ---------------------------------------------------------------------------------
def test_cancel_copies_what_9_1_names_and_nothing_else():
    forwarded = forward_request(
        req_of(invite("Route: <sip:p2.example.com;lr>", "Supported: ms-sender", body=b"v=0\r\n")),
        target_uri=POOL_URI,
        via_value=MY_VIA,
    )
    cancel = make_cancel(forwarded)
    assert (
        cancel
        == (
            "CANCEL %s SIP/2.0\r\n"
            "Via: %s\r\n"
            "Route: <sip:p2.example.com;lr>\r\n"
            "Max-Forwards: 70\r\n"
            'From: "Alice" <sip:alice@contoso.com>;tag=a1;epid=01010101\r\n'
            "To: <sip:ocschat@contoso.com>\r\n"
            "Call-ID: c1\r\n"
            "CSeq: 1 CANCEL\r\n"
            "Content-Length: 0\r\n\r\n" % (POOL_URI, MY_VIA)
        ).encode()
    )
    msg = parse(cancel)
    assert isinstance(msg, Request) and msg.body == b""


def test_cancel_takes_the_first_value_of_a_combined_via_line():
    data = invite().replace(
        b"Via: SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1\r\nVia: ",
        b"Via: SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1, ",
    )
    assert (
        lines_of(make_cancel(data))[1] == "Via: SIP/2.0/TLS fe.contoso.com:5061;branch=z9hG4bKfe1"
    )


def test_an_ack_cannot_be_cancelled():
    ack = invite().replace(b"INVITE sip", b"ACK sip").replace(b"1 INVITE", b"1 ACK")
    with pytest.raises(SipError):
        make_cancel(ack)


def test_process_response_rejects_a_request():
    with pytest.raises(SipError):
        process_response(invite(), "z9hG4bKfe1")
