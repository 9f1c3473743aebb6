"""Hypothesis properties of the SIP core: round trip, the fuzz contract, stream framing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.sip.errors import SipError
from proxy.sip.framing import KeepAlivePing, MessageFramed, StreamFramer
from proxy.sip.message import Request, Response, parse
from proxy.sip.peer import Send

from .sipmsg import TCP_PEER, UDP_PEER, ack_for, cancel_for, make_element, request, response, sends

CORPUS = Path(__file__).parent.parent / "corpus"
SEEDS = [
    request(),
    request("OPTIONS", "sip:127.0.0.1:5060", body=b"v=0\r\n\r\nx"),
    request("SUBSCRIBE", extra=("Event: presence", "Require: foo")),
    request(via="SIP/2.0/UDP 10.0.0.1;rport;branch=z9hG4bK-9", to="<sip:a@b.c>;tag=1"),
    response(302, "Moved Temporarily", extra=("Contact: <sip:ocschat@pcpool.contoso.com>",)),
    ack_for(request(), response(302, "Moved")),
    cancel_for(request()),
] + [p.read_bytes() for p in sorted(CORPUS.glob("rfc*/*.sip"))]

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
TOKEN = st.text(TOKEN_CHARS, min_size=1)
WORD = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
HOST = st.builds(lambda a, b: "%s.%s.com" % (a, b), WORD, WORD)
SPACING = st.sampled_from(["", " ", "  ", "\t", " \t"])
#: Printable Latin-1 without CR/LF: what a header value may hold.
VALUE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")


# (a) round trip ---------------------------------------------------------------
@dataclass
class Generated:
    data: bytes
    method: str
    uri: str
    branch: str
    from_tag: str
    call_id: str
    cseq: int
    max_forwards: int | None
    body: bytes
    keys: list[str]


def _name(draw: st.DrawFn, long: str, compact: str | None) -> str:
    choices = [long, long.lower(), long.upper()]
    if compact:
        choices += [compact, compact.upper()]
    return draw(st.sampled_from(choices))


def _fold(draw: st.DrawFn, value: str) -> str:
    """Maybe fold a value at its spaces (RFC 3261 §7.3.1)."""
    if " " not in value.strip(" ") or not draw(st.booleans()):
        return value
    head, _, tail = value.strip(" ").partition(" ")
    return head + draw(st.sampled_from(["\r\n ", "\r\n\t", "\r\n   "])) + tail


@st.composite
def sip_requests(draw: st.DrawFn) -> Generated:
    method = draw(st.sampled_from(["INVITE", "OPTIONS", "SUBSCRIBE", "MESSAGE", "BYE"]) | TOKEN)
    user, host = draw(WORD), draw(HOST)
    uri = "sip:%s@%s" % (user, host)
    if draw(st.booleans()):
        uri += ":%d" % draw(st.integers(1, 65535))
    if draw(st.booleans()):
        uri += ";transport=%s" % draw(st.sampled_from(["udp", "tcp", "tls"]))
    branch = "z9hG4bK" + draw(TOKEN)
    from_tag, call_id = draw(TOKEN), draw(WORD) + "@" + draw(HOST)
    cseq = draw(st.integers(0, 2**31 - 1))
    max_forwards = draw(st.none() | st.integers(0, 255))
    body = draw(st.binary(max_size=200) | st.sampled_from([b"\r\n", b"a\r\n\r\nb", b"v=0\r\n"]))
    via_host = draw(HOST | st.sampled_from(["192.0.2.1", "[2001:db8::1]"]))
    via = "SIP/2.0/%s %s" % (draw(st.sampled_from(["UDP", "TCP", "TLS", "udp"])), via_host)
    if draw(st.booleans()):
        via += ":%d" % draw(st.integers(1, 65535))
    via += ";branch=%s" % branch + draw(st.sampled_from(["", ";rport", ";received=192.0.2.9"]))
    display = draw(st.sampled_from(["", '"Alice" ', "Alice ", '"A, \\"B\\"" ']))

    fields = [
        ("via", _name(draw, "Via", "v"), _fold(draw, via)),
        ("from", _name(draw, "From", "f"), "%s<sip:a@%s>;tag=%s" % (display, host, from_tag)),
        ("to", _name(draw, "To", "t"), "<%s>" % uri),
        ("call-id", _name(draw, "Call-ID", "i"), call_id),
        ("cseq", _name(draw, "CSeq", None), "%d %s" % (cseq, method)),
        ("content-length", _name(draw, "Content-Length", "l"), str(len(body))),
    ]
    if max_forwards is not None:
        fields.append(("max-forwards", _name(draw, "Max-Forwards", None), str(max_forwards)))
    if draw(st.booleans()):
        fields.append(("contact", _name(draw, "Contact", "m"), "<sip:%s@%s>" % (user, via_host)))
    extra_names = draw(
        st.lists(
            st.sampled_from(
                ["X-Unknown", "ms-endpoint-location-data", "ms-subnet", "MS-Keep-Alive",
                 "ms-client-diagnostics", "User-Agent", "Subject", "Supported", "Allow"]
            )
            | st.builds(lambda t: "X-" + t, TOKEN),
            max_size=6,
        )
    )  # fmt: skip
    for name in extra_names:
        value = draw(st.text(VALUE_CHARS, max_size=40))
        fields.append((name.lower(), name, _fold(draw, value)))
    fields = draw(st.permutations(fields))

    lines = ["%s %s SIP/2.0" % (method, uri)]
    for _key, name, value in fields:
        before = draw(st.sampled_from(["", "", " ", "\t"]))  # HCOLON (RFC 3261 §25.1)
        lines.append("%s%s:%s%s" % (name, before, draw(SPACING), value))
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    keys = [key for key, _, _ in fields]
    return Generated(data, method, uri, branch, from_tag, call_id, cseq, max_forwards, body, keys)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_requests())
def test_parse_then_serialise_gives_back_the_same_bytes(gen: Generated) -> None:
    msg = parse(gen.data)
    assert bytes(msg) == gen.data
    assert isinstance(msg, Request)
    assert (msg.method, msg.uri) == (gen.method, gen.uri)
    assert msg.via is not None and msg.via.branch == gen.branch
    assert msg.from_addr is not None and msg.from_addr.tag == gen.from_tag
    assert msg.to_addr is not None and msg.to_addr.uri == gen.uri
    assert msg.get("call-id") == gen.call_id
    assert msg.cseq is not None and (msg.cseq.number, msg.cseq.method) == (gen.cseq, gen.method)
    assert msg.max_forwards == gen.max_forwards
    assert msg.body == gen.body
    assert msg.keys == gen.keys


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_requests())
def test_a_stream_message_parses_the_same_as_a_datagram(gen: Generated) -> None:
    (event,) = StreamFramer().feed(gen.data)
    assert isinstance(event, MessageFramed) and event.data == gen.data
    assert bytes(parse(event.data, stream=True)) == bytes(parse(gen.data))


# (b) the fuzz contract ------------------------------------------------------------
INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b":", b" ", b";", b",", b'"', b"<", b">", b"@", b"%",
           b"[", b"]", b"\\", b"\r\n ", b"\r\n\r\n", b"\xff", b"=", b"%E2%82%AC", b"%0D%0A",
           b"sip:", b"tel:", b";tag=x", b";rport", b"z9hG4bK", b"SIP/2.0"]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes flipped, cut, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(INSERTS))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            end = data.find(b"\r\n", at)
            if end > 0:
                data[end:end] = data[at:end] + b"\r\n"
    return bytes(data)


ANY_BYTES = st.binary(max_size=1500)
NEAR_SIP = mutated()


def _parse_contract(data: bytes, stream: bool) -> None:
    try:
        msg = parse(data, stream=stream)
    except SipError as exc:
        assert 300 <= exc.status <= 599
        partial = getattr(exc, "partial", None)
        assert partial is None or isinstance(partial, Request)
    else:
        assert isinstance(msg, Request | Response)
        bytes(msg)  # whatever was accepted can be written back


@settings(max_examples=1000, deadline=None)
@given(ANY_BYTES | NEAR_SIP, st.booleans())
@example(b"INVITE sip:a@b SIP/2.0\r\n\r\n", False)
@example(b"\r\n\r\n", False)
@example(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n", False)
def test_parse_accepts_or_raises_sip_error_only(data: bytes, stream: bool) -> None:
    _parse_contract(data, stream)


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    """A byte stream of valid, mutated and random pieces, cut at random points."""
    pieces = draw(st.lists(st.sampled_from(SEEDS) | NEAR_SIP | ANY_BYTES | st.just(b"\r\n\r\n"),
                           max_size=4))  # fmt: skip
    stream = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=800, deadline=None)
@given(chunked())
def test_framer_yields_events_or_raises_sip_error_only(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_message=4096)
    for chunk in chunks:
        try:
            events = framer.feed(chunk)
        except SipError:
            return  # the connection is closed
        for event in events:
            assert isinstance(event, MessageFramed | KeepAlivePing)
            if isinstance(event, MessageFramed):
                assert len(event.data) <= 4096
                _parse_contract(event.data, stream=True)
        assert framer.buffered <= 4096


def _check_sends(sends: list[Send]) -> None:
    assert isinstance(sends, list)
    for send in sends:
        assert isinstance(send, Send) and send.data.startswith(b"SIP/2.0 ")
        assert send.data.endswith(b"\r\n\r\n")


@settings(max_examples=1000, deadline=None)
@given(st.lists(ANY_BYTES | NEAR_SIP, min_size=1, max_size=4), st.booleans())
@example([request(uri="sip:%E2%82%AC%0D%0A@contoso.com")], False)
@example([request(version="SIP/3.0"), request(extra=("Require: a b",))], False)
def test_element_receive_never_raises(datagrams: list[bytes], tcp: bool) -> None:
    element = make_element()
    peer = TCP_PEER if tcp else UDP_PEER
    now = 0.0
    for data in datagrams:
        _check_sends(sends(element.receive(data, peer, now)))
        now += 0.3
        _check_sends(sends(element.handle_timers(now)))
    _check_sends(sends(element.handle_timers(now + 100.0)))
    assert element.transactions == {}
    assert element.next_deadline() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SEEDS) | NEAR_SIP, min_size=2, max_size=6))
def test_element_survives_retransmissions_acks_and_cancels_in_any_order(
    datagrams: list[bytes],
) -> None:
    element = make_element()
    for n, data in enumerate(datagrams + datagrams[::-1]):
        _check_sends(sends(element.receive(data, UDP_PEER, n * 0.1)))
        assert element.in_flight() <= len(element.transactions)
    _check_sends(sends(element.handle_timers(1000.0)))
    assert element.transactions == {}


# (c) framing -------------------------------------------------------------------
STREAM_MESSAGES = [
    request(),
    request("OPTIONS", body=b"v=0\r\n\r\n\r\nbody with blank lines\r\n\r\n"),
    request("MESSAGE", body=b"\r\n\r\n"),
    response(200, "OK", body=b"hello"),
    request(extra=("l: 0",), content_length=0).replace(b"Content-Length: 0\r\n", b""),
    request(body=b"x" * 300).replace(b"Content-Length:", b"content-LENGTH  :"),
]


@st.composite
def message_stream(draw: st.DrawFn) -> tuple[list[object], list[bytes]]:
    items: list[object] = draw(
        st.lists(
            st.sampled_from(STREAM_MESSAGES) | st.just(KeepAlivePing()), min_size=1, max_size=8
        )
    )
    parts = [item if isinstance(item, bytes) else b"\r\n\r\n" for item in items]
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return items, [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=500, deadline=None)
@given(message_stream())
@example(([KeepAlivePing(), request()], [b"\r\n", b"\r", b"\n", request()]))
def test_stream_cut_anywhere_yields_exactly_the_messages_and_pings(
    case: tuple[list[object], list[bytes]],
) -> None:
    items, chunks = case
    framer = StreamFramer()
    events: list[object] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    expected = [MessageFramed(i) if isinstance(i, bytes) else i for i in items]
    assert events == expected
    assert framer.buffered == 0


def test_single_crlf_between_messages_is_skipped() -> None:
    """RFC 3261 §7.5 on a stream: a lone CRLF is no ping."""
    framer = StreamFramer()
    events = framer.feed(request() + b"\r\n" + request("OPTIONS"))
    assert events == [MessageFramed(request()), MessageFramed(request("OPTIONS"))]


def test_header_section_past_the_bound_is_too_large() -> None:
    framer = StreamFramer(max_message=100)
    try:
        framer.feed(b"INVITE sip:a@b SIP/2.0\r\nX: " + b"a" * 200)
    except SipError as exc:
        assert exc.status == 513
    else:
        raise AssertionError("no MessageTooLarge")


def test_malformed_content_length_on_a_stream_cannot_be_framed() -> None:
    """The end of the message, so the start of the next, is unknown: the
    connection has to be closed rather than the body read as a message."""
    for value in (b"abc", b"-5", b"1 0"):
        data = request(body=b"INVITE", content_length=value.decode())
        try:
            events = StreamFramer().feed(data)
        except SipError as exc:
            assert exc.status == 400
        else:
            raise AssertionError("framed %r" % events)
