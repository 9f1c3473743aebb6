"""The redirect fast path (``proxy.sip.redirect``) answers exactly as the
general path does.

Two elements serve the same table, one with ``fast_redirect`` and one
without, with the same To-tag sequence.  Every request, its retransmission,
its ACK and every timer afterwards must make both send the same bytes to the
same place; the properties generate everyday requests and every kind of
oddity the fast path must leave to the general one (RFC 3261 §7.3.1 folding,
duplicates, §8.2.2.3 Require, §16.3 Max-Forwards, §18.2.1 received/rport,
§12.2.2 in-dialog To tags, RFC 4475 and RFC 5118 messages).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import routing
from proxy.element import Element
from proxy.sip.errors import UriError
from proxy.sip.peer import Peer, Send
from proxy.sip.redirect import scan
from proxy.sip.uri import parse_uri
from proxy.store import Endpoint

from .sipmsg import TCP_PEER, UDP_PEER, endpoint, make_element, status_of
from .test_torture import CASES, CORPUS

SIPP_INVITE = (
    b"INVITE sip:ocschat@contoso.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Chat Client 7" <sip:user7@contoso.com>;tag=7SIPpTag007;epid=5eb17\r\n'
    b"To: <sip:ocschat@contoso.com>\r\n"
    b"Call-ID: 7-4242@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:user7@contoso.com;opaque=user:epid:5eb17;gruu>\r\n"
    b"Supported: ms-sender\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\nv=0\n"
)
LYNC_SUBSCRIBE = (
    b"SUBSCRIBE sip:OCSChat@Contoso.com SIP/2.0\r\n"
    b"v: SIP/2.0/TCP 10.1.2.3:49152;branch=z9hG4bKabc;rport;ms-received-port=49152\r\n"
    b"Max-Forwards: 70\r\n"
    b"f: <sip:alice@contoso.com>;tag=f00;epid=1a2b3c\r\n"
    b"t: <sip:OCSChat@Contoso.com>\r\n"
    b"i: 4d5e6f\r\n"
    b"CSeq: 1 SUBSCRIBE\r\n"
    b"Event: presence\r\n"
    b"l: 0\r\n\r\n"
)
PROXIED = replace(endpoint("sip:proxied@contoso.com"), mode="proxy")
REDIRECTED = endpoint()
#: The chat URI at a pool with port and transport: the Contact carries both.
TLS_POOL = endpoint(pool_port=5041, pool_transport="tls")


@dataclass
class Twins:
    """An element with the fast path and one without, the same in all else."""

    fast: Element
    general: Element

    def receive(self, data: bytes, peer: Peer, now: float) -> list[Send]:
        fast = self.fast.receive(data, peer, now)
        general = self.general.receive(data, peer, now)
        assert fast == general
        assert self.fast.next_deadline() == self.general.next_deadline()
        assert len(self.fast.transactions) == len(self.general.transactions)
        return [a for a in fast if isinstance(a, Send)]

    def run_timers(self) -> None:
        """Every timer to the end, the two in step."""
        for _ in range(200):
            deadline = self.fast.next_deadline()
            assert deadline == self.general.next_deadline()
            if deadline is None:
                break
            assert self.fast.handle_timers(deadline) == self.general.handle_timers(deadline)
        assert len(self.fast.transactions) == len(self.general.transactions)
        assert self.fast.counters == self.general.counters


def twins(*endpoints: Endpoint, draining: bool = False) -> Twins:
    eps = endpoints or (REDIRECTED, PROXIED)
    pair = Twins(make_element(*eps), make_element(*eps, fast_redirect=False))
    pair.general._tag_prefix = pair.fast._tag_prefix
    pair.fast.draining = pair.general.draining = draining
    return pair


def exchange(pair: Twins, data: bytes, peer: Peer) -> list[Send]:
    """A request, its retransmission, the ACK for a 3xx-6xx to an INVITE,
    a late retransmission, then every timer: the twins in step throughout."""
    sent = pair.receive(data, peer, 1.0)
    pair.receive(data, peer, 1.2)
    if sent and data.startswith(b"INVITE ") and status_of(sent[0].data) >= 300:
        pair.receive(_ack(data, sent[0].data), peer, 1.3)
        pair.receive(data, peer, 1.4)
    pair.run_timers()
    return sent


_TO_TAG = re.compile(rb"\r\n(?:to|t)[ \t]*:[^\r\n]*;tag=([^;\r\n]+)", re.I)


def _ack(invite: bytes, final: bytes) -> bytes:
    """An ACK that copies the INVITE's lines but CSeq and To (§17.1.1.3)."""
    head = invite.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    lines = [b"ACK" + head[0][head[0].index(b" ") :]]
    for line in head[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"to", b"t"):
            m = _TO_TAG.search(final)
            tag = m.group(1) if m else None
            lines.append(line + (b";tag=" + tag if tag and b"tag=" not in line else b""))
        elif name == b"cseq":
            lines.append(line.rsplit(b" ", 1)[0] + b" ACK")
        elif name not in (b"content-length", b"l", b"content-type"):
            lines.append(line)
    return b"\r\n".join(lines + [b"Content-Length: 0"]) + b"\r\n\r\n"


# the fast path is taken where it should be --------------------------------------
@pytest.mark.parametrize("data", [SIPP_INVITE, LYNC_SUBSCRIBE], ids=["sipp", "lync"])
def test_everyday_requests_take_the_fast_path(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert scan(data, 65535, 128) is not None
    element = make_element()
    monkeypatch.setattr("proxy.element.parse", _no_general_parse)
    (send,) = element.receive(data, UDP_PEER, 1.0)
    assert isinstance(send, Send) and status_of(send.data) == 302
    assert element.counters["redirects"] == 1


def _no_general_parse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the general parser ran")


@pytest.mark.parametrize("data", [SIPP_INVITE, LYNC_SUBSCRIBE], ids=["sipp", "lync"])
@pytest.mark.parametrize("peer", [UDP_PEER, TCP_PEER], ids=["udp", "tcp"])
def test_everyday_requests_get_the_same_bytes(data: bytes, peer: Peer) -> None:
    (send,) = exchange(twins(), data, peer)
    assert status_of(send.data) == 302


def test_the_contact_names_the_pool_port_and_transport() -> None:
    (send,) = exchange(twins(TLS_POOL), SIPP_INVITE, UDP_PEER)
    assert b"\r\nContact: <sip:ocschat@pcpool.contoso.com:5041;transport=tls>\r\n" in send.data


def test_a_table_change_is_seen_at_once() -> None:
    """The fast path remembers Contacts per snapshot: a new one forgets them."""
    element = make_element()
    first = element.receive(SIPP_INVITE, UDP_PEER, 1.0)[0]
    assert b"pcpool.contoso.com;" not in first.data  # type: ignore[union-attr]
    element.snapshot = make_element(TLS_POOL).snapshot
    again = SIPP_INVITE.replace(b"z9hG4bK-7-1-0", b"z9hG4bK-8-1-0")
    second = element.receive(again, UDP_PEER, 1.0)[0]
    assert b"pcpool.contoso.com:5041;transport=tls>" in second.data  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ((b"Max-Forwards: 70", b"Max-Forwards: 0"), "483"),
        ((b"Supported: ms-sender", b"Require: ms-sender"), "420"),
        ((b"To: <sip:ocschat@contoso.com>", b"To: <sip:ocschat@contoso.com>;tag=x"), "dialog"),
        (
            (
                b"Via: SIP/2.0/UDP 127.0.0.1:5061;",
                b"Via: SIP/2.0/UDP 127.0.0.1:5061;maddr=1.2.3.4;",
            ),
            "maddr",
        ),
        ((b"CSeq: 1 INVITE", b"CSeq: 1 BYE"), "400"),
        ((b"Supported: ms-sender\r\n", b"Supported: ms-sender\r\n  , 100rel\r\n"), "folded"),
        ((b"sip:ocschat@contoso.com SIP", b"sip:proxied@contoso.com SIP"), "proxied"),
        ((b"sip:ocschat@contoso.com SIP", b"sip:nobody@contoso.com SIP"), "404"),
        ((b"Call-ID: 7-4242@127.0.0.1", b"Call-ID: 7 4242"), "400"),
        ((b"Content-Length: 4", b"Content-Length: 9"), "400"),
    ],
)
def test_what_the_fast_path_leaves_to_the_general_one(
    change: tuple[bytes, bytes], why: str
) -> None:
    data = SIPP_INVITE.replace(*change)
    assert data != SIPP_INVITE
    if why not in ("proxied", "404"):
        assert scan(data, 65535, 128) is None
    exchange(twins(), data, UDP_PEER)


def test_draining_answers_503_on_either_path() -> None:
    (send,) = exchange(twins(draining=True), SIPP_INVITE, UDP_PEER)
    assert status_of(send.data) == 503


# properties ------------------------------------------------------------------
_NAMES = {
    "via": ["Via", "v", "VIA", "via", "Via "],
    "from": ["From", "f", "FROM"],
    "to": ["To", "t", "TO", "to "],
    "call-id": ["Call-ID", "i", "call-id", "Call-Id"],
    "cseq": ["CSeq", "cseq", "CSEQ"],
    "max-forwards": ["Max-Forwards", "max-forwards"],
    "content-length": ["Content-Length", "l", "content-length"],
}
_SEPARATORS = [": ", ":", ":  ", " : ", ":\t"]
_URIS = [
    "sip:ocschat@contoso.com",
    "sip:OCSChat@Contoso.COM",
    "sip:ocschat@contoso.com;transport=tcp",
    "sip:ocs%63hat@contoso.com",
    "sip:proxied@contoso.com",
    "sip:nobody@contoso.com",
    "sip:contoso.com",
    "sips:ocschat@contoso.com",
    "sip:ocschat@contoso.com:5060",
    "sip:oc schat@contoso.com",
    "tel:+14255550100",
]
_VIA_HOSTS = ["127.0.0.1", "10.0.0.9", "client.contoso.com", "[::1]", "CLIENT.contoso.com"]
_VIA_PORTS = ["", ":5060", ":5061", ":40000", ":015061", ":99999"]
_VIA_PARAMS = [
    ";branch=z9hG4bK-{n}",
    ";branch=z9hG4bK-{n}",
    ";BRANCH=z9hG4bK-{n}",
    ";branch=1234-{n}",
    ";rport",
    ";rport=5061",
    ";received=192.0.2.1",
    ";maddr=10.0.0.1",
    ";ttl=1",
    ";alias",
    ";ms-received-port=5061",
    ";branch",
]
_FROMS = [
    '"Alice" <sip:alice@contoso.com>;tag=a{n}',
    "Alice Smith <sip:alice@contoso.com>;tag=a{n};epid=1",
    "<sip:alice@contoso.com>;tag=a{n}",
    "sip:alice@contoso.com;tag=a{n}",
    "<tel:+1425>;tag=a{n}",
    '"Al\\"ice" <sip:alice@contoso.com>;tag=a{n}',
    '"unterminated <sip:alice@contoso.com>',
    "<sip:alice@contoso.com>",
    "<sip:alice@-bad-.com>;tag=1",
]
_TOS = [
    "<{uri}>",
    "<{uri}>",
    "<sip:ocschat@contoso.com>;tag=t1",
    "<sip:ocschat@contoso.com>;TAG=t1",
    "<sip:ocschat@contoso.com>;epid=7",
    '"Chat" <sip:ocschat@contoso.com>',
    "sip:ocschat@contoso.com",
    "<sip:ocschat@contoso.com",
]
_EXTRAS = [
    "Contact: <sip:alice@contoso.com;gruu>",
    "Supported: ms-sender",
    "X-Weird_Header~:value",
    "Require: ",
    "Require: ms-sender",
    "Proxy-Require: foo",
    "Route: <sip:fe.contoso.com;lr>",
    "Bad Header: x",
    "NoColon",
    " continuation",
    "Event: presence",
]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request for the chat URI in the everyday shape, with now and then
    (about one draw in eight each) a variation the fast path must read the
    same way as the general parser, or leave to it."""

    def odd() -> bool:
        return draw(st.integers(0, 7)) == 7  # the simplest example is the usual one

    def pick(usual: str, others: list[str]) -> str:
        return draw(st.sampled_from(others)) if odd() else usual

    n = draw(st.integers(0, 10**6))
    method = draw(st.sampled_from(["INVITE", "SUBSCRIBE"])) if not odd() else "OPTIONS"
    uri = pick("sip:ocschat@contoso.com", _URIS)
    version = pick("SIP/2.0", ["SIP/2.1", "sip/2.0"])

    def line(key: str, value: str) -> str:
        name = pick(_NAMES[key][0], _NAMES[key]) if key in _NAMES else key
        return name + pick(": ", _SEPARATORS) + value

    params = ";branch=z9hG4bK-{n}"
    while odd():
        params += draw(st.sampled_from(_VIA_PARAMS))
    if odd():
        params = params.partition(";branch=z9hG4bK-{n}")[2]  # no branch first
    via = "SIP/2.0/%s %s%s%s" % (
        pick("UDP", ["TCP", "udp", "TLS"]),
        pick("127.0.0.1", _VIA_HOSTS),
        pick(":5061", _VIA_PORTS),
        params.format(n=n),
    )
    if odd():
        via += ", SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-x"
    headers = [line("via", via)]
    if odd():
        headers.append(
            line("via", "SIP/2.0/TCP 192.0.2.7:5060;branch=z9hG4bK-fe;received=10.0.0.1")
        )
    headers.append(line("from", pick(_FROMS[0], _FROMS).format(n=n)))
    headers.append(line("to", pick(_TOS[0], _TOS).format(uri=uri)))
    headers.append(line("call-id", pick("c%d@h" % n, ["c%d" % n, "", "a b"])))
    cseq_method = pick(method, ["BYE", method.lower()])
    cseq_number = pick("1", ["4711", "2147483647", "2147483648", "x", "01"])
    headers.append(line("cseq", pick("%s %s", ["%s  %s", "%s\t%s"]) % (cseq_number, cseq_method)))
    max_fwd = pick("70", ["", "0", "1", "255", "256", "07", "x"])
    if max_fwd:
        headers.append(line("max-forwards", max_fwd))
    while odd():
        headers.append(draw(st.sampled_from(_EXTRAS)))
    if odd():
        headers.append(draw(st.sampled_from(headers)))  # a duplicate
    body = draw(st.sampled_from([b"", b"v=0\r\n"]))
    length = pick("auto", ["", "x", "99", "0", " 5"])
    if length:
        headers.append(line("content-length", str(len(body)) if length == "auto" else length))
    if odd():
        headers = draw(st.permutations(headers))
    text = "%s %s %s\r\n%s\r\n\r\n" % (method, uri, version, "\r\n".join(headers))
    data = text.encode("latin-1") + body
    if odd():
        data = data.replace(b"\r\n", b"\n", 1)  # a bare LF
    if odd():
        data = b"\r\n" + data  # a leading CRLF (§7.5)
    return data


_PEERS = st.sampled_from(
    [
        UDP_PEER,
        Peer("udp", "127.0.0.1", 5061),
        Peer("udp", "10.0.0.9", 40000),
        Peer("udp", "client.contoso.com", 5060),
        TCP_PEER,
    ]
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=requests(), peer=_PEERS, draining=st.booleans())
def test_fast_and_general_paths_send_the_same(data: bytes, peer: Peer, draining: bool) -> None:
    exchange(twins(draining=draining), data, peer)


@settings(max_examples=300, deadline=None)
@given(data=requests())
def test_the_fast_path_answers_the_everyday_ones(data: bytes) -> None:
    """Whatever ``scan`` accepts for the chat URI, the element answers with a
    302 from the fast path alone (the general parser never runs)."""
    element = make_element()
    if scan(data, 65535, 128) is None:
        return
    try:
        uri = parse_uri(data.split(b" ")[1].decode())
    except UriError:
        return
    decision = routing.decide(element.snapshot, uri, "redirect")
    if not isinstance(decision, routing.Redirect):
        return  # the general path answers what the table does not redirect
    with patch("proxy.element.parse", _no_general_parse):
        out = element.receive(data, UDP_PEER, 1.0)
    assert [status_of(s.data) for s in out if isinstance(s, Send)] == [302]


@pytest.mark.parametrize(("rfc", "name", "entry"), CASES)
def test_the_torture_corpus_gets_the_same_answers(rfc: str, name: str, entry: object) -> None:
    """Each message's own Request-URI is put in the table, so the ones the
    fast path can read are redirected by it."""
    data = (CORPUS / rfc / ("%s.sip" % name)).read_bytes()
    try:
        own = endpoint(data.split(b" ", 2)[1].decode("latin-1"))
    except Exception:  # not a request, or a URI no table could hold
        pair = twins()
    else:
        pair = twins(REDIRECTED, own)
    exchange(pair, data, UDP_PEER)


@settings(max_examples=1000, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda cut, junk: SIPP_INVITE[:cut] + junk + SIPP_INVITE[cut:],
            st.integers(0, len(SIPP_INVITE)),
            st.binary(max_size=8),
        ),
    )
)
def test_scan_never_raises(data: bytes) -> None:
    """Any bytes, and the everyday INVITE with any bytes put anywhere in it:
    ``scan`` reads them or says None, it never raises (the fuzz contract)."""
    scanned = scan(data, 65535, 128)
    if scanned is not None:
        assert scanned.method in ("INVITE", "SUBSCRIBE")
        assert scanned.branch.startswith("z9hG4bK")


@settings(max_examples=500, deadline=None)
@given(
    cut=st.integers(0, len(SIPP_INVITE)),
    junk=st.binary(max_size=6),
    drop=st.integers(0, 3),
)
def test_a_damaged_everyday_request_gets_the_same_answer(cut: int, junk: bytes, drop: int) -> None:
    """The everyday INVITE with bytes put in (and a few taken out) anywhere:
    both paths answer alike, whether the fast path reads it or not."""
    data = SIPP_INVITE[:cut] + junk + SIPP_INVITE[cut + drop :]
    exchange(twins(), data, UDP_PEER)


def test_the_caches_keep_no_long_values() -> None:
    """What a peer sends cannot fill memory: header names, To values and
    parsed name-addrs longer than 256 characters are read, not remembered."""
    from proxy.sip import headers, redirect
    from proxy.sip import scan as scanning

    long_name = b"X-" + b"a" * 300
    long_to = '"%s" <sip:ocschat@contoso.com>' % ("b" * 300)
    data = SIPP_INVITE.replace(
        b"To: <sip:ocschat@contoso.com>", b"To: " + long_to.encode()
    ).replace(b"Supported: ms-sender", long_name + b": 1")
    assert scan(data, 65535, 128) is not None
    assert long_name not in scanning.NAMES
    assert long_to.encode() not in redirect._plain_to
    headers.NameAddr.parse(long_to)
    assert long_to not in headers._recurring


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (SIPP_INVITE.replace(b"127.0.0.1:5061;", b"127.0.0.1:99999;", 1), "Via port out of range"),
        (
            SIPP_INVITE.replace(b"Content-Length: 4", b"Content-Length: 70004") + b"x" * 70000,
            "larger than max_message_size",
        ),
    ],
)
def test_out_of_range_and_oversized_requests_are_left_to_the_general_path(
    data: bytes, why: str
) -> None:
    assert scan(data, 65535, 128) is None, why
    exchange(twins(), data, UDP_PEER)


def test_a_content_length_over_65535_is_left_to_the_general_path() -> None:
    """With max_message_size raised, a body of 70 000 bytes fits the message,
    but the general parser takes no Content-Length over 65535 (§20.14 in
    pcproxy's bounds): the fast path leaves it, and both answer alike."""
    data = SIPP_INVITE.replace(b"Content-Length: 4", b"Content-Length: 70004") + b"x" * 70000
    assert scan(data, 1 << 20, 128) is None
    eps = (REDIRECTED, PROXIED)
    pair = Twins(
        make_element(*eps, max_message_size=1 << 20),
        make_element(*eps, max_message_size=1 << 20, fast_redirect=False),
    )
    pair.general._tag_prefix = pair.fast._tag_prefix
    (answer,) = exchange(pair, data, UDP_PEER)
    assert status_of(answer.data) == 400


@pytest.mark.parametrize(
    "via",
    [
        b"SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0;received=10.0.0.9",
        b"SIP/2.0/UDP client.contoso.com:5061;branch=z9hG4bK-7-1-0;received=127.0.0.1;rport",
    ],
)
def test_a_via_that_has_received_already_gets_the_same_answer(via: bytes) -> None:
    """§18.2.1: received is added only when the Via has none; the fast path
    keeps what the general one keeps."""
    data = SIPP_INVITE.replace(b"SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0", via, 1)
    assert scan(data, 65535, 128) is not None
    (answer,) = exchange(twins(), data, UDP_PEER)
    assert answer.data.count(b";received=") == 1


def test_the_contact_cache_is_bounded_and_stays_right() -> None:
    """Many distinct Request-URIs (most not in the table) empty the cache of
    Contacts when it is full; the chat URI is still redirected after."""
    element = make_element()
    for n in range(1100):
        other = SIPP_INVITE.replace(b"INVITE sip:ocschat@", b"INVITE sip:u%d@" % n, 1)
        element.receive(other.replace(b"z9hG4bK-7", b"z9hG4bK-u%d" % n), UDP_PEER, 1.0)
    assert len(element._redirects) <= 1024
    (send,) = element.receive(SIPP_INVITE, UDP_PEER, 1.0)
    assert isinstance(send, Send) and status_of(send.data) == 302
