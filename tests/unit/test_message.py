"""Parsing and serialising SIP messages (RFC 3261 §7, §8.2.6, §18.3)."""

from __future__ import annotations

import pytest

from proxy.sip.errors import MessageTooLarge, ParseError, SipError, VersionNotSupported
from proxy.sip.headers import NameAddr
from proxy.sip.message import (
    MAX_LINE,
    Header,
    Request,
    Response,
    make_response,
    parse,
    parse_read,
)

from .sipmsg import CHAT_URI, request, response

SDP = (
    b"v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.1\r\ns=-\r\n"
    b"c=IN IP4 192.0.2.1\r\nt=0 0\r\nm=message 5060 sip null\r\n"
)

COMPACT = (
    b"INVITE sip:ocschat@contoso.com SIP/2.0\r\n"
    b"v: SIP/2.0/TCP client.contoso.com:5061;branch=z9hG4bKc1\r\n"
    b"f: <sip:alice@contoso.com>;tag=ft\r\n"
    b"t: <sip:ocschat@contoso.com>\r\n"
    b"i: compact-1@client\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"m: <sip:alice@client.contoso.com;transport=tls>\r\n"
    b"c: application/sdp\r\n"
    b"k: ms-sender, timer\r\n"
    b"l: %d\r\n"
    b"\r\n" % len(SDP)
) + SDP

FOLDED = (
    b"OPTIONS sip:ocschat@contoso.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP\r\n"
    b"   client.contoso.com:5060;branch=z9hG4bKf1\r\n"
    b"From: <sip:alice@contoso.com>;tag=ft\r\n"
    b"To: <sip:ocschat@contoso.com>\r\n"
    b"Call-ID: folded-1@client\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Subject: I know you're there,\r\n"
    b"   pick up the phone\r\n"
    b"\tand talk to me!\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


# requests and responses --------------------------------------------------------
def test_parses_request_line_and_the_headers_every_element_needs() -> None:
    msg = parse(request(body=SDP, extra=("Content-Type: application/sdp",)))
    assert isinstance(msg, Request)
    assert (msg.method, msg.uri, msg.version) == ("INVITE", CHAT_URI, "SIP/2.0")
    assert msg.via is not None and msg.via.transport == "UDP"
    assert (msg.via.host, msg.via.port, msg.via.branch) == ("127.0.0.1", 5060, "z9hG4bK-1")
    assert msg.from_addr is not None and msg.from_addr.tag == "a1"
    assert msg.from_addr.display == '"Alice"'
    assert msg.to_addr is not None and msg.to_addr.uri == CHAT_URI and msg.to_addr.tag is None
    assert msg.cseq is not None and (msg.cseq.number, msg.cseq.method) == (1, "INVITE")
    assert msg.max_forwards == 70
    assert msg.get("call-id") == "call-1@client.contoso.com"
    assert msg.get("content-type") == "application/sdp"
    assert msg.get("subject") is None
    assert msg.body == SDP


def test_parses_status_line_and_reason() -> None:
    msg = parse(response(486, "Busy Here", cseq_method="INVITE"))
    assert isinstance(msg, Response)
    assert (msg.version, msg.status, msg.reason) == ("SIP/2.0", 486, "Busy Here")
    assert msg.to_addr is not None and msg.to_addr.tag == "b2"


def test_status_line_without_reason_phrase() -> None:
    """RFC 4475 §3.1.1.12: the Reason-Phrase may be empty."""
    data = response(100, "").replace(b"SIP/2.0 100\r\n", b"SIP/2.0 100 \r\n")
    msg = parse(data)
    assert isinstance(msg, Response) and (msg.status, msg.reason) == (100, "")
    assert bytes(msg) == data


@pytest.mark.parametrize(
    "status_line", [b"SIP/2.0 20 OK", b"SIP/2.0 2000 OK", b"SIP/2.0 abc OK", b"SIP/2.0 099 X"]
)
def test_malformed_status_code_is_a_parse_error(status_line: bytes) -> None:
    data = status_line + response()[response().index(b"\r\n") :]
    with pytest.raises(ParseError):
        parse(data)


def test_compact_forms_name_the_long_headers() -> None:
    msg = parse(COMPACT)
    assert msg.keys == [
        "via", "from", "to", "call-id", "cseq", "contact", "content-type", "supported",
        "content-length",
    ]  # fmt: skip
    assert msg.via is not None and (msg.via.transport, msg.via.port) == ("TCP", 5061)
    assert msg.get("call-id") == "compact-1@client"
    assert msg.get_all("supported") == ["ms-sender", "timer"]
    assert msg.body == SDP
    assert [h.name for h in msg.headers][:3] == ["v", "f", "t"]
    assert bytes(msg) == COMPACT


def test_header_names_are_case_insensitive() -> None:
    data = request().replace(b"Via:", b"VIA:").replace(b"Call-ID:", b"call-id:")
    msg = parse(data)
    assert msg.get("via") is not None and msg.get("call-id") == "call-1@client.contoso.com"
    assert bytes(msg) == data


def test_folded_header_is_unfolded_and_the_raw_line_kept() -> None:
    """RFC 3261 §7.3.1: a line starting with SP or HTAB continues the previous one."""
    msg = parse(FOLDED)
    assert msg.get("subject") == "I know you're there, pick up the phone and talk to me!"
    subject = [h for h in msg.headers if h.key == "subject"][0]
    assert (
        subject.raw == "Subject: I know you're there,\r\n   pick up the phone\r\n\tand talk to me!"
    )
    assert msg.via is not None and msg.via.host == "client.contoso.com"
    assert bytes(msg) == FOLDED


def test_continuation_line_before_any_header_is_a_parse_error() -> None:
    data = (
        b"OPTIONS sip:a@b.example SIP/2.0\r\n folded\r\n"
        + request()[request().index(b"\r\n") + 2 :]
    )
    with pytest.raises(ParseError):
        parse(data)


def test_comma_separated_via_values_and_lines_form_one_list() -> None:
    data = request(
        via="SIP/2.0/UDP first.example.com;branch=z9hG4bK1 ,SIP/2.0/TCP second.example.com:5070"
        ";branch=z9hG4bK2",
        extra=("Via: SIP/2.0/TLS third.example.com;branch=z9hG4bK3",),
    )
    msg = parse(data)
    assert msg.via is not None and (msg.via.host, msg.via.branch) == (
        "first.example.com",
        "z9hG4bK1",
    )
    assert [v.split(";")[0] for v in msg.get_all("via")] == [
        "SIP/2.0/UDP first.example.com",
        "SIP/2.0/TCP second.example.com:5070",
        "SIP/2.0/TLS third.example.com",
    ]
    assert msg.top_via().host == "first.example.com"
    assert bytes(msg) == data


def test_quoted_strings_keep_escaped_quotes_and_commas() -> None:
    data = request(
        from_=r'"Doe, \"JD\" John" <sip:jd@contoso.com>;tag=q1',
        extra=(
            r'Contact: "A, \"B\"" <sip:b@contoso.com;x=1>;q=0.5, <sip:c@contoso.com>',
            'Subject: "not, a list"',
        ),
    )
    msg = parse(data)
    assert msg.from_addr is not None
    assert msg.from_addr.display == r'"Doe, \"JD\" John"'
    assert msg.from_addr.tag == "q1"
    contacts = msg.get_all("contact")
    assert contacts == [r'"A, \"B\"" <sip:b@contoso.com;x=1>;q=0.5', "<sip:c@contoso.com>"]
    first = NameAddr.parse(contacts[0])
    assert first.display == r'"A, \"B\""'
    assert (first.uri, first.params) == ("sip:b@contoso.com;x=1", [("q", "0.5")])
    assert bytes(msg) == data


def test_unbalanced_quote_in_from_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse(request(from_='"Alice <sip:alice@contoso.com>;tag=a1'))


# framing -----------------------------------------------------------------------
def test_leading_crlfs_are_ignored() -> None:
    """RFC 3261 §7.5."""
    data = request()
    msg = parse(b"\r\n\r\n\r\n" + data)
    assert isinstance(msg, Request) and msg.method == "INVITE"
    assert bytes(msg) == data


def test_datagram_body_is_cut_to_content_length() -> None:
    """RFC 3261 §18.3: octets past Content-Length in a datagram are discarded."""
    data = request(body=SDP)
    msg = parse(data + b"INVITE sip:noise SIP/2.0\r\n\r\n")
    assert msg.body == SDP
    assert bytes(msg) == data


def test_datagram_body_shorter_than_content_length_is_400() -> None:
    with pytest.raises(ParseError) as info:
        parse(request(body=SDP, content_length=len(SDP) + 1))
    assert info.value.status == 400
    assert isinstance(info.value.partial, Request)  # type: ignore[attr-defined]


def test_datagram_without_content_length_takes_the_rest_as_body() -> None:
    assert parse(request(body=SDP, content_length=None)).body == SDP


def test_stream_message_without_content_length_has_no_body() -> None:
    assert parse(request(body=SDP, content_length=None), stream=True).body == b""


def test_stream_body_is_exactly_content_length() -> None:
    assert parse(request(body=SDP), stream=True).body == SDP


@pytest.mark.parametrize("value", ["-1", "abc", "", "1 2", "99999999999"])
def test_malformed_content_length_is_400(value: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(request(content_length=value))
    assert info.value.status == 400


def test_conflicting_content_lengths_are_400() -> None:
    """RFC 4475 §3.1.2.11 (mcl01)."""
    data = request(body=SDP, extra=("l: %d" % (len(SDP) - 1),))
    with pytest.raises(ParseError, match="content-length"):
        parse(data)


def test_repeated_equal_content_length_is_accepted() -> None:
    data = request(body=SDP, extra=("l: %d" % len(SDP),))
    assert parse(data).body == SDP


def test_end_of_datagram_ends_an_unterminated_header_section() -> None:
    """RFC 4475 §3.1.2.14 (baddn) has no empty line after the last header."""
    data = request()
    head = data[:-2]
    msg = parse(head)
    assert isinstance(msg, Request) and msg.get("content-length") == "0"
    assert bytes(msg) == data


@pytest.mark.parametrize("cut", [10, 60, -3])
def test_datagram_cut_inside_a_line_is_400(cut: int) -> None:
    with pytest.raises(ParseError):
        parse(request()[:cut])


def test_stream_message_without_empty_line_is_400() -> None:
    with pytest.raises(ParseError):
        parse(request()[:-2], stream=True)


# errors ------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["Via", "From", "To", "Call-ID", "CSeq"])
def test_missing_mandatory_header_is_400_with_the_partial_request(missing: str) -> None:
    data = b"\r\n".join(
        line for line in request().split(b"\r\n") if not line.startswith(missing.encode() + b":")
    )
    with pytest.raises(ParseError, match=missing.lower()) as info:
        parse(data)
    assert info.value.status == 400
    partial = info.value.partial  # type: ignore[attr-defined]
    assert isinstance(partial, Request) and partial.method == "INVITE"
    if missing != "Via":
        assert partial.top_via().branch == "z9hG4bK-1"


def test_response_errors_carry_no_partial() -> None:
    data = b"\r\n".join(line for line in response().split(b"\r\n") if not line.startswith(b"To:"))
    with pytest.raises(ParseError) as info:
        parse(data)
    assert not hasattr(info.value, "partial")


@pytest.mark.parametrize("header", ["From", "To", "Call-ID", "CSeq", "Max-Forwards"])
def test_repeated_single_valued_header_is_400(header: str) -> None:
    line = [x for x in request().split(b"\r\n") if x.startswith(header.encode() + b":")][0]
    data = request(extra=(line.decode(),))
    with pytest.raises(ParseError, match="more than one"):
        parse(data)


def test_cseq_method_that_does_not_match_the_request_is_400() -> None:
    """RFC 4475 §3.1.2.16 (mismatch01)."""
    with pytest.raises(ParseError, match="does not match") as info:
        parse(request("OPTIONS", cseq_method="INVITE"))
    assert isinstance(info.value.partial, Request)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "cseq", ["1", "x INVITE", "-1 INVITE", "2147483648 INVITE", "1 INVITE extra", "1 INV/ITE"]
)
def test_malformed_cseq_is_400(cseq: str) -> None:
    data = request().replace(b"CSeq: 1 INVITE", b"CSeq: " + cseq.encode())
    with pytest.raises(ParseError):
        parse(data)


def test_largest_cseq_number_is_accepted() -> None:
    data = request(cseq=2**31 - 1)
    cseq = parse(data).cseq
    assert cseq is not None and cseq.number == 2**31 - 1


def test_max_forwards_above_255_is_400() -> None:
    assert parse(request(max_forwards=255)).max_forwards == 255  # type: ignore[union-attr]
    with pytest.raises(ParseError, match="Max-Forwards"):
        parse(request(max_forwards=256))


def test_absent_max_forwards_is_none() -> None:
    msg = parse(request(max_forwards=None))
    assert isinstance(msg, Request) and msg.max_forwards is None


@pytest.mark.parametrize("call_id", ["two words", "tab\there"])
def test_call_id_with_whitespace_is_400(call_id: str) -> None:
    with pytest.raises(ParseError, match="Call-ID"):
        parse(request(call_id=call_id))


def test_sip_3_request_is_505_with_the_headers_kept() -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse(request(version="SIP/3.0"))
    assert info.value.status == 505
    partial = info.value.partial  # type: ignore[attr-defined]
    assert isinstance(partial, Request) and partial.top_via().branch == "z9hG4bK-1"


def test_sip_3_response_is_505() -> None:
    data = response().replace(b"SIP/2.0 200", b"SIP/3.0 200", 1)
    with pytest.raises(VersionNotSupported) as info:
        parse(data)
    assert info.value.status == 505


@pytest.mark.parametrize(
    "line",
    [
        b"INVITE  sip:ocschat@contoso.com  SIP/2.0",
        b"INVITE sip:ocschat@contoso.com; lr SIP/2.0",
        b"INVITE sip:ocschat@contoso.com SIP/2.0 ",
        b"INVITE sip:ocschat@contoso.com HTTP/1.1",
        b"IN<VITE sip:ocschat@contoso.com SIP/2.0",
    ],
)
def test_malformed_request_line_is_400_with_the_headers_kept(line: bytes) -> None:
    """RFC 4475 §3.1.2.6, §3.1.2.7: answerable because the Via can be read."""
    data = line + request()[request().index(b"\r\n") :]
    with pytest.raises(ParseError) as info:
        parse(data)
    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial.top_via().branch == "z9hG4bK-1"


def test_too_many_headers_is_513_keeping_the_first_ones() -> None:
    extra = tuple("X-Filler-%d: %d" % (i, i) for i in range(20))
    with pytest.raises(MessageTooLarge) as info:
        parse(request(extra=extra), max_headers=10)
    assert info.value.status == 513
    partial = info.value.partial  # type: ignore[attr-defined]
    assert len(partial.lines) == 10 and partial.top_via().branch == "z9hG4bK-1"


def test_message_larger_than_the_bound_is_513() -> None:
    data = request(body=b"x" * 2000)
    with pytest.raises(MessageTooLarge):
        parse(data, max_size=len(data) - 1)
    assert parse(data, max_size=len(data)).body == b"x" * 2000


def test_header_line_longer_than_the_bound_is_513() -> None:
    with pytest.raises(MessageTooLarge):
        parse(request(extra=("X-Long: " + "a" * MAX_LINE,)))


@pytest.mark.parametrize("line", ["No colon here", "Bad Name: x", ": empty name", "X(y): z"])
def test_malformed_header_line_is_400(line: str) -> None:
    with pytest.raises(ParseError):
        parse(request(extra=(line,)))


def test_every_error_is_a_sip_error() -> None:
    for exc in (ParseError("x"), MessageTooLarge("x"), VersionNotSupported("x")):
        assert isinstance(exc, SipError)


# building responses ------------------------------------------------------------
INVITE = request(
    via="SIP/2.0/UDP client.contoso.com:5060;branch=z9hG4bKmr1;rport",
    from_='"Alice"  <sip:alice@contoso.com>;tag=a1;epid=E1',
    to="  <sip:OCSChat@contoso.com>",
    extra=(
        "v: SIP/2.0/TCP proxy.contoso.com;branch=z9hG4bKmr0",
        "Contact: <sip:alice@client.contoso.com>",
        "Timestamp: 54",
        "Record-Route: <sip:proxy.contoso.com;lr>",
    ),
)


def _lines(resp: Response) -> list[str]:
    return bytes(resp).decode("latin-1").split("\r\n")


def _request_line(data: bytes, prefix: str) -> str:
    return [x for x in data.decode("latin-1").split("\r\n") if x.startswith(prefix)][0]


def test_make_response_copies_via_from_call_id_cseq_byte_for_byte() -> None:
    """RFC 3261 §8.2.6.2."""
    req = parse(INVITE)
    assert isinstance(req, Request)
    lines = _lines(make_response(req, 404, to_tag="t9"))
    assert lines[0] == "SIP/2.0 404 Not Found"
    for prefix in ("Via:", "v:", "From:", "Call-ID:", "CSeq:"):
        assert _request_line(INVITE, prefix) in lines
    assert lines.index(_request_line(INVITE, "Via:")) < lines.index(_request_line(INVITE, "v:"))
    for absent in ("Contact:", "Record-Route:", "Timestamp:", "Max-Forwards:"):
        assert not [x for x in lines if x.startswith(absent)]
    assert lines[-3:] == ["Content-Length: 0", "", ""]


def test_make_response_adds_a_to_tag_only_when_absent() -> None:
    req = parse(INVITE)
    assert isinstance(req, Request)
    lines = _lines(make_response(req, 302, to_tag="t9"))
    assert _request_line(INVITE, "To:") + ";tag=t9" in lines

    tagged = request(to="<sip:ocschat@contoso.com>;tag=existing")
    req = parse(tagged)
    assert isinstance(req, Request)
    assert "To: <sip:ocschat@contoso.com>;tag=existing" in _lines(
        make_response(req, 481, to_tag="t9")
    )


def test_make_response_100_has_no_to_tag_and_copies_timestamp() -> None:
    """RFC 3261 §8.2.6.1."""
    req = parse(INVITE)
    assert isinstance(req, Request)
    lines = _lines(make_response(req, 100, to_tag="t9"))
    assert _request_line(INVITE, "To:") in lines
    assert "Timestamp: 54" in lines


def test_make_response_replaces_vias_adds_extras_and_body() -> None:
    req = parse(INVITE)
    assert isinstance(req, Request)
    via = [Header.make("Via", "SIP/2.0/UDP client.contoso.com:5060;received=192.0.2.9")]
    resp = make_response(
        req, 302, "Moved", to_tag="t9", via=via, extra=[Header.make("Contact", "<sip:x@y.z>")],
        body=b"hello",
    )  # fmt: skip
    lines = _lines(resp)
    assert lines[0] == "SIP/2.0 302 Moved"
    assert lines[1] == "Via: SIP/2.0/UDP client.contoso.com:5060;received=192.0.2.9"
    assert not [
        x for x in lines if x.startswith(("v:", "Via: SIP/2.0/UDP client.contoso.com:5060;b"))
    ]
    assert lines[-4:] == ["Contact: <sip:x@y.z>", "Content-Length: 5", "", "hello"]
    again = parse(bytes(resp))
    assert isinstance(again, Response) and again.status == 302 and again.body == b"hello"


def test_make_response_uses_unknown_for_an_unlisted_status() -> None:
    req = parse(INVITE)
    assert isinstance(req, Request)
    assert make_response(req, 499).reason == "Unknown"


# byte fidelity ------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        request(),
        request(body=SDP, extra=("Content-Type: application/sdp",)),
        request("SUBSCRIBE", extra=("Event: presence", "ms-keep-alive: UAS; hop-hop=yes")),
        COMPACT,
        FOLDED,
        response(),
        response(302, "Moved Temporarily", extra=("Contact: <sip:ocschat@pcpool.contoso.com>",)),
        request(from_="sip:alice@contoso.com;tag=a1", to="sip:ocschat@contoso.com"),
        request(extra=("X-Odd-Spacing:\t  value with  spaces  ", "Empty:")),
        request(extra=("Subject: caf\xe9 \xfc\xff",)),
    ],
    ids=lambda d: d.split(b"\r\n", 1)[0][:30].decode("latin-1"),
)
def test_untouched_message_serialises_to_the_bytes_parsed(data: bytes) -> None:
    assert bytes(parse(data)) == data


def test_request_built_by_hand_serialises() -> None:
    req = Request(method="OPTIONS", uri="sip:127.0.0.1")
    req.add(Header.make("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1"))
    req.add(Header.make("Max-Forwards", "70"), index=0)
    assert bytes(req) == (
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nMax-Forwards: 70\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\r\n"
    )
    assert req.get("max-forwards") == "70" and req.raw_lines("via") == [
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1"
    ]


def test_parse_read_gives_the_request_a_fast_path_kept_and_refuses_anything_else() -> None:
    data = request()
    assert bytes(parse_read(data, stream=False)) == bytes(parse(data))
    with pytest.raises(ParseError):
        parse_read(response(200), stream=True)
