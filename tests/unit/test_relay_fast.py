"""The proxy's fast paths (``proxy.sip.relay``) pass every INVITE, every
response, every ACK for a 2xx and every other request of a dialog on
exactly as the general path does.

Responses, two proofs.  Where ``scan_response`` reads a response at all, the
general parser reads it too, without error, and agrees on the status, the
client transaction's key (RFC 3261 §17.1.3) and the bytes passed on without
pcproxy's Via (§16.7 step 9): checked for generated responses with every
oddity the scan must leave to the general parser (§7.3.1 folding and
duplicates, §18.3 framing, §20.16 CSeq, comma-joined Vias), for damaged
everyday responses and for the RFC 4475/5118 corpus.  And two elements, one
with the fast paths and one without, send the same bytes at the same times
through whole proxied calls: answered, refused, failed over, cancelled,
duplicated, with the dialog's requests in both directions.

ACKs: the same two elements, after a call answered 200, get the client's
ACK as SIPp writes it, changed in every way the general path must see
(§16.3 Max-Forwards and Proxy-Require, §16.4 Routes of someone else's or a
strict router's, §16.6 step 8 where our Via goes, names to resolve,
damaged bytes), and must send the same.

The dialog's other requests (BYE, INFO, UPDATE...), likewise: everyday ones
from the client over UDP and TCP, towards a UDP or TCP pool, a 12 KB INFO,
the pool's own over the client's flow; what follows them (the pool answers
200, 481 or 503, or never; the client sends again; the pool is unreachable:
pcproxy then answers from the request it parses only then); generated and
damaged BYEs.  Two elements also hold the same transactions, contexts and
timers when each scenario is over.

The INVITE (and SUBSCRIBE) that starts a call: every scenario above starts
by the fast path; each of 47 changes to the everyday INVITE (§16.3 checks,
§16.4 Routes, §16.6 Record-Route placement and loop-hash fields, §8.2.6 the
100 Trying, Vias below the top), over UDP and TCP, generated combinations of
them, damaged INVITEs, a 12 KB body and an INVITE that loops back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.element import Element, Listener, Output
from proxy.resolve import Target
from proxy.sip.client_transaction import client_key, response_key
from proxy.sip.errors import SipError
from proxy.sip.message import Response, parse
from proxy.sip.peer import Peer
from proxy.sip.proxy_core import strip_own_via
from proxy.sip.relay import ScannedResponse, scan_in_dialog, scan_response, strip_top_via

from .sipmsg import CLIENT_VIA, ack_for, cancel_for, field_values, reply_to
from .test_proxy_element import (
    CLIENT_TCP,
    CLIENT_UDP,
    EXTRAS,
    NAMES,
    POOL1,
    POOL2,
    POOL_TCP,
    SPACINGS,
    Client,
    Fault,
    Network,
    Node,
    Pool,
    _fold,
    client_in_dialog,
    client_invites,
    invite,
    pool_in_dialog,
    wire,
)
from .test_torture import CASES, CORPUS

T = TypeVar("T")
OUR_VIA = "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK5d1e.0a1b2c3d4e5f6071;rport=5060"
EVERYDAY_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: " + OUR_VIA.encode() + b"\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0;rport=5061\r\n"
    b"Record-Route: <sip:o.ab@127.0.0.1:5060;transport=udp;lr>, "
    b"<sip:i.cd@127.0.0.1:5060;transport=udp;lr>\r\n"
    b'From: "Chat Client 7" <sip:user7@contoso.com>;tag=7SIPpTag007;epid=5eb17\r\n'
    b"To: <sip:ocschat@contoso.com>;tag=pool-1\r\n"
    b"Call-ID: 7-4242@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:pool@127.0.0.2:5070;transport=udp>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\nv=0\n"
)


def agree(data: bytes, max_size: int = 65535, max_headers: int = 128) -> bool:
    """Where the scan reads ``data``, the general parser reads it alike, as a
    datagram and as a stream message; returns whether the scan read it."""
    scanned = scan_response(data, max_size, max_headers)
    if scanned is None:
        return False
    for stream in (False, True):
        msg = parse(data, stream=stream, max_size=max_size, max_headers=max_headers)
        assert isinstance(msg, Response)
        assert msg.status == scanned.status
        assert response_key(msg) == client_key(scanned.branch, scanned.method)
        for branch in (scanned.branch, "z9hG4bKsomebody-else"):
            assert strip_own_via(msg, data, branch) == strip_top_via(scanned, data, branch)
    return True


def test_an_everyday_response_is_read_and_passed_on_without_our_via() -> None:
    assert agree(EVERYDAY_200)
    scanned = scan_response(EVERYDAY_200, 65535, 128)
    assert scanned is not None
    assert (scanned.status, scanned.method) == (200, "INVITE")
    assert scanned.branch == "z9hG4bK5d1e.0a1b2c3d4e5f6071"
    passed = strip_top_via(scanned, EVERYDAY_200, scanned.branch)
    assert passed == EVERYDAY_200.replace(b"Via: " + OUR_VIA.encode() + b"\r\n", b"")


#: A 180 from SIPp's pool scenario as it came to pcproxy: ``[last_Via:]``
#: writes every Via of the request on one line.
SIPP_180 = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5378;branch=z9hG4bKproxy.1;rport, "
    b"SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-client;rport=5061\r\n"
    b"From: <sip:a@contoso.com>;tag=1\r\n"
    b"To: <sip:ocschat@contoso.com>;tag=5477SIPpTag011\r\n"
    b"Call-ID: c1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Record-Route: <sip:o.x@127.0.0.1:5378;transport=udp;lr>, "
    b"<sip:i.y@127.0.0.1:5378;transport=udp;lr>\r\n"
    b"Contact: <sip:pool@127.0.0.1:5377;transport=UDP>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_vias_on_one_line_lose_the_first_value_only() -> None:
    assert agree(SIPP_180)
    scanned = scan_response(SIPP_180, 65535, 128)
    assert scanned is not None and scanned.branch == "z9hG4bKproxy.1"
    assert strip_top_via(scanned, SIPP_180, "z9hG4bKproxy.1") == SIPP_180.replace(
        b"Via: SIP/2.0/UDP 127.0.0.1:5378;branch=z9hG4bKproxy.1;rport, ", b"Via: "
    )
    for odd in (b"rport ,SIP", b"rport,  SIP", b"rport,SIP"):
        assert agree(SIPP_180.replace(b"rport, SIP", odd))
    assert agree(SIPP_180.replace(b", SIP/2.0/UDP 127.0.0.1:5061", b",  junk ; x, SIP/2.0/UDP 1"))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ((b"SIP/2.0 200 OK", b"\r\nSIP/2.0 200 OK"), "a leading CRLF (§7.5)"),
        ((b"SIP/2.0 200 OK", b"SIP/2.0 200"), "no space after the code"),
        ((b"SIP/2.0 200 OK", b"SIP/2.0 099 Odd"), "a code outside 1xx-6xx"),
        ((b"SIP/2.0 200 OK", b"SIP/3.0 200 OK"), "another version (§7.2)"),
        ((b"CSeq: 1 INVITE\r\n", b"CSeq: 1 INVITE\r\nCSeq: 2 INVITE\r\n"), "two CSeqs"),
        ((b"Call-ID: 7-4242", b"Call-ID: 7 4242"), "a blank in the Call-ID"),
        ((b"CSeq: 1 INVITE", b"CSeq: x INVITE"), "a CSeq number that is not one"),
        ((b"CSeq: 1 INVITE", b"CSeq: 2147483648 INVITE"), "a CSeq number of 2**31"),
        ((b"Content-Length: 4", b"Content-Length: 3"), "a body past Content-Length"),
        ((b"Content-Length: 4", b"Content-Length: 5"), "a body short of it"),
        ((b"Content-Length: 4\r\n", b""), "no Content-Length"),
        ((b"127.0.0.1:5060;branch", b"[::1]:5060;branch"), "an IPv6 sent-by"),
        ((b"127.0.0.1:5060;branch", b"127.0.0.1:65536;branch"), "a port out of range"),
        ((b";branch=z9hG4bK5d1e.0a1b2c3d4e5f6071", b""), "no branch"),
        ((b"To: <sip:ocschat@contoso.com>", b"To: sip:ocschat@contoso.com"), "an addr-spec To"),
        ((b"Contact: <sip", b"Contact:\r\n <sip"), "a folded line (§7.3.1)"),
        ((b"Contact: <sip", b"Contact: <s\rip"), "a bare CR"),
    ],
)
def test_what_the_scan_leaves_to_the_general_parser(change: tuple[bytes, bytes], why: str) -> None:
    data = EVERYDAY_200.replace(*change)
    assert data != EVERYDAY_200, why
    assert scan_response(data, 65535, 128) is None, why


def test_a_response_with_only_our_via_is_left_to_the_general_path() -> None:
    """§16.7 step 3: with no Via left there is nobody to pass it to."""
    data = EVERYDAY_200.replace(
        b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0;rport=5061\r\n", b""
    )
    assert scan_response(data, 65535, 128) is None


def test_the_name_addr_cache_keeps_no_long_values() -> None:
    """The From and To of a dialog are remembered once found everyday; one
    longer than 256 characters is read every time, so a peer cannot fill
    the cache with long values."""
    from proxy.sip import scan as scanning

    long_from = b'"%s" <sip:user7@contoso.com>;tag=7' % (b"c" * 300)
    data = EVERYDAY_200.replace(
        b'"Chat Client 7" <sip:user7@contoso.com>;tag=7SIPpTag007;epid=5eb17', long_from
    )
    assert agree(data)
    assert long_from not in scanning._everyday
    assert b"<sip:ocschat@contoso.com>;tag=pool-1" in scanning._everyday


def test_the_limits_of_the_general_parser_hold() -> None:
    assert scan_response(EVERYDAY_200, len(EVERYDAY_200) - 1, 128) is None
    assert scan_response(EVERYDAY_200, 65535, 9) is None
    assert agree(EVERYDAY_200, len(EVERYDAY_200), 10)


# generated responses ------------------------------------------------------------------------
STATUS_LINES = [
    "SIP/2.0 100 Trying",
    "SIP/2.0 180 Ringing",
    "SIP/2.0 200 OK",
    "SIP/2.0 200 ",
    "SIP/2.0 486 Busy Here",
    "SIP/2.0 603 Decline",
    "SIP/2.0 200 Ok \xe9t\xe9",
    "SIP/2.0 700 Strange",
    "SIP/2.0 20 Short",
    "SIP/2.0 200",
    "SIP/2.1 200 OK",
]
TOP_VIAS = [
    OUR_VIA,
    OUR_VIA.replace(";rport=5060", ";received=10.0.0.1;rport=5060"),
    OUR_VIA.replace("branch=", "BRANCH="),
    OUR_VIA.replace("branch=z9hG4bK5d1e.0a1b2c3d4e5f6071", "branch="),
    OUR_VIA.replace("branch=z9hG4bK5d1e.0a1b2c3d4e5f6071", "branch"),
    OUR_VIA.replace("UDP 127.0.0.1:5060", "TCP pcproxy.contoso.com"),
    OUR_VIA.replace("UDP 127.0.0.1:5060", "TLS [2001:db8::7]:5061"),
    OUR_VIA.replace("5060;", "0;"),
    OUR_VIA + " ",
    OUR_VIA + ";branch=z9hG4bKsecond",
    OUR_VIA + ", " + CLIENT_VIA + ";branch=z9hG4bK-c",
    OUR_VIA + ' ,SIP/2.0/TCP [::1]:5060;x="a,b", ' + CLIENT_VIA,
    OUR_VIA + ",",
    OUR_VIA.replace("UDP ", "UDP [::1]") + ", " + CLIENT_VIA,
    OUR_VIA.replace("SIP/2.0/UDP ", "SIP / 2.0 / UDP "),
]
ADDRESSES = [
    "<sip:ocschat@contoso.com>;tag=p1",
    '"Chat Client 7" <sip:user7@contoso.com>;tag=7SIPpTag007;epid=5eb17',
    '"Esc \\"q\\"" <sip:a@b.example>;tag=x',
    "Alice Smith <sip:alice@contoso.com>",
    "<sips:alice@contoso.com;transport=tls>;tag=9",
    "<sip:alice@[2001:db8::1]>;tag=9",
    "sip:alice@contoso.com;tag=9",
    "<sip:alice@contoso.com",
    "",
]
CSEQS = ["1 INVITE", "2 BYE", "1  INFO", "1\tUPDATE", "x INVITE", "1", "99999999999 BYE", "1 B@D"]
#: A second line of a header (the general parser refuses most of them).
SECONDS = [("cseq", "1 INVITE"), ("to", ADDRESSES[0]), ("max-forwards", "70"), ("Require", "x")]
CALL_IDS = ["7-4242@127.0.0.1", "a", "", "has space", "x\ty"]


def mostly(everyday: T, odd: Sequence[T]) -> st.SearchStrategy[T]:
    """``everyday`` three times in four, else one of ``odd``."""
    return st.sampled_from([everyday] * (3 * len(odd)) + list(odd))


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """Responses from the pool as a server might write them: everyday ones,
    with compact and odd-case names and odd spacing, and every oddity the
    scan must leave alone, alone or together."""
    body = draw(st.sampled_from([b"", b"v=0\r\n", b"<xml/>\r\n\r\n<more/>"]))
    body += draw(st.binary(max_size=20))
    vias = [draw(mostly(TOP_VIAS[0], TOP_VIAS[1:]))]
    below = CLIENT_VIA + ";branch=z9hG4bK-c1;rport=5060"
    vias += draw(st.lists(mostly(below, ["bad via"]), max_size=3))
    n = len(body)
    odd_lengths: list[str | None] = [str(n + 1), str(max(n - 1, 0)), None, "4a"]
    length = draw(mostly(str(n), odd_lengths))
    fields = [("via", v) for v in vias] + [
        ("from", draw(mostly(ADDRESSES[1], ADDRESSES[2:]))),
        ("to", draw(mostly(ADDRESSES[0], ADDRESSES[2:]))),
        ("call-id", draw(mostly(CALL_IDS[0], CALL_IDS[1:]))),
        ("cseq", draw(mostly(CSEQS[0], CSEQS[1:]))),
    ]
    if length is not None:
        fields.append(("content-length", length))
    fields += draw(st.lists(st.sampled_from(EXTRAS), max_size=4, unique=True))
    if draw(mostly(False, [True])):
        fields.append(draw(st.sampled_from(SECONDS)))
    if draw(st.booleans()):
        fields = draw(st.permutations(fields))
    folded = draw(mostly(False, [True]))
    lines = [draw(mostly(STATUS_LINES[2], STATUS_LINES))]
    for key, value in fields:
        name = draw(st.sampled_from(NAMES.get(key, [key])))
        lines.append(
            name + draw(st.sampled_from(SPACINGS)) + (_fold(draw, value) if folded else value)
        )
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return draw(mostly(b"", [b"\r\n"])) + data


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_the_scan_agrees_with_the_general_parser_on_generated_responses(data: bytes) -> None:
    agree(data)


def test_generated_responses_take_both_paths() -> None:
    """The property above is not empty: a good share of what it generates is
    read by the scan, and a good share is left to the general parser."""
    read = 0
    examples = []

    @settings(max_examples=400, deadline=None, database=None)
    @given(responses())
    def collect(data: bytes) -> None:
        examples.append(data)

    collect()
    read = sum(agree(data) for data in examples)
    assert 0.05 * len(examples) < read < 0.95 * len(examples)


@settings(max_examples=600, deadline=None)
@given(
    cut=st.integers(0, len(EVERYDAY_200)),
    junk=st.binary(max_size=4) | st.sampled_from([b"\r\n", b",", b":", b" ", b"\r\n "]),
    drop=st.integers(0, 3),
)
def test_a_damaged_everyday_response_is_read_alike_or_left_alone(
    cut: int, junk: bytes, drop: int
) -> None:
    agree(EVERYDAY_200[:cut] + junk + EVERYDAY_200[cut + drop :])


@pytest.mark.parametrize(("rfc", "name", "entry"), CASES)
def test_the_torture_corpus_is_read_alike_or_left_alone(rfc: str, name: str, entry: object) -> None:
    """Each message as it is, and its header section as a pool's response
    (the start line a 200's, pcproxy's Via on top): RFC 4475 and RFC 5118
    put every oddity of §7 in those lines."""
    data = (CORPUS / rfc / ("%s.sip" % name)).read_bytes()
    agree(data)
    eol = data.find(b"\r\n")
    if eol > 0:
        agree(b"SIP/2.0 200 OK\r\nVia: " + OUR_VIA.encode() + data[eol:])


# two elements through whole calls ------------------------------------------------------------
@contextmanager
def same_randomness() -> Iterator[None]:
    """Branches from a counter instead of ``secrets`` and To-tags from zero
    bytes instead of ``os.urandom``, so that two elements driven alike make
    the same bytes."""
    counter = itertools.count()
    with (
        patch("secrets.token_hex", lambda n=32: "%0*x" % (2 * n, next(counter))),
        patch("os.urandom", bytes),
    ):
        yield


Scenario = Callable[[bool], Network]
SECRET = b"k" * 32


def _wire(*pools: Pool, fast: bool, client: Peer = CLIENT_UDP) -> tuple[Network, Client]:
    return wire(*pools, client=client, fast_relay=fast, secret=SECRET)


def _answered(fast: bool, client: Peer = CLIENT_UDP) -> Network:
    pool = Pool("pool1", POOL1, (100, 180, 200))
    net, uac = _wire(pool, fast=fast, client=client)
    uac.call(invite(client))
    net.advance()
    (final,) = uac.got(b"SIP/2.0 200 ")
    uac.send(client_in_dialog("ACK", final, cseq=1, peer=client))
    net.advance()
    uac.send(client_in_dialog("INFO", final, cseq=2, peer=client))
    net.advance(0.5)
    (at_pool,) = pool.got(b"INVITE ")
    pool.send(pool_in_dialog("BYE", pool, at_pool))
    net.advance(0.5)
    uac.send(client_in_dialog("BYE", final, cseq=3, peer=client))
    net.advance(0.5)
    pool.retransmit_final()
    return net


class JoiningPool(Pool):
    """A pool that writes every Via of a response on one line, as SIPp's
    ``[last_Via:]`` does."""

    def send(self, data: bytes) -> None:
        if data.startswith(b"SIP/2.0 "):
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            vias = [line.partition(b": ")[2] for line in lines if line.startswith(b"Via: ")]
            at = next(i for i, line in enumerate(lines) if line.startswith(b"Via: "))
            lines = [line for line in lines if not line.startswith(b"Via: ")]
            lines.insert(at, b"Via: " + b", ".join(vias))
            data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        super().send(data)


def _joined(fast: bool) -> Network:
    pool = JoiningPool("pool1", POOL1, (100, 180, 200))
    net, uac = _wire(pool, fast=fast)
    uac.call(invite())
    net.advance()
    (final,) = uac.got(b"SIP/2.0 200 ")
    assert final.count(b"Via: ") == 1
    uac.send(client_in_dialog("BYE", final, cseq=2))
    return net


def _refused(fast: bool) -> Network:
    net, uac = _wire(Pool("pool1", POOL1, (180, 486)), fast=fast)
    uac.call(invite())
    return net


def _failed_over(fast: bool) -> Network:
    net, uac = _wire(Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, (180, 200)), fast=fast)
    uac.call(invite())
    return net


def _cancelled(fast: bool) -> Network:
    net, uac = _wire(Pool("pool1", POOL1, (180, (10.0, 200))), fast=fast)
    uac.call(invite())
    net.advance(1.0)
    uac.send(cancel_for(uac.invite))
    return net


def _duplicated(fast: bool) -> Network:
    net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=fast)
    net.faults.append(Fault(b"SIP/2.0 ", to="proxy", copies=2))
    uac.call(invite())
    net.advance()
    (final, *_) = uac.got(b"SIP/2.0 200 ")
    uac.send(client_in_dialog("ACK", final, cseq=1))
    return net


def _ack_for_486(fast: bool) -> Network:
    net, uac = _wire(Pool("pool1", POOL1, (486,)), fast=fast)
    uac.call(invite())
    net.advance()
    (busy,) = uac.got(b"SIP/2.0 486 ")
    uac.send(ack_for(uac.invite, busy))
    return net


SCENARIOS: dict[str, Scenario] = {
    "answered over UDP": _answered,
    "answered over TCP": lambda fast: _answered(fast, client=CLIENT_TCP),
    "answered by a pool that joins the Vias": _joined,
    "refused with 486": _refused,
    "failed over after a 503": _failed_over,
    "cancelled after a 180": _cancelled,
    "every response twice": _duplicated,
    "a 486 acked by the client": _ack_for_486,
}


def transcript(scenario: Scenario, fast: bool) -> tuple[list[object], dict[str, int]]:
    """Every Send of the element with its time, every note for the log, the
    targets it marked failed and its counters, after the scenario and every
    timer to the end."""
    with same_randomness():
        net = scenario(fast)
        element = net.element
        tables = (element.transactions, element.clients, element._by_server)
        held: list[object] = [sorted(map(repr, table)) for table in tables]  # when it is over
        held.append([len(element.contexts), len(element._accepted), len(element.timers)])
        net.advance(600.0)
    sent: list[object] = [(at, s.data, s.peer) for at, s in net.sent]
    return sent + net.notes + net.marked + held, dict(net.element.counters)


def alike(scenario: Scenario) -> tuple[list[object], dict[str, int]]:
    """The transcript of ``scenario``, the same with the fast paths as without."""
    fast = transcript(scenario, fast=True)
    assert fast == transcript(scenario, fast=False)
    return fast


def sent_data(record: tuple[list[object], dict[str, int]]) -> list[bytes]:
    """The bytes of every Send in a ``transcript``."""
    return [entry[1] for entry in record[0] if isinstance(entry, tuple)]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_an_element_with_the_fast_path_sends_what_one_without_it_sends(name: str) -> None:
    fast = alike(SCENARIOS[name])
    assert fast[0], "the scenario sent nothing"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_invites())
def test_generated_invites_make_the_same_calls_with_and_without_the_fast_path(
    data: bytes,
) -> None:
    """The pool copies the client's Via, From, To, Call-ID and CSeq lines as
    they came (folded, compact, odd-case), so its responses take the fast path
    or not: the element sends the same either way."""

    def call(fast: bool) -> Network:
        net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=fast)
        uac.call(data)
        return net

    alike(call)


# the ACK for a 2xx ----------------------------------------------------------------------------
class Anywhere(dict[tuple[str, int], Node]):
    """The nodes of a network by address, where an address nobody was put
    at gets a node that takes what comes (a damaged Route may name any)."""

    def __init__(self, net: Network, nodes: dict[tuple[str, int], Node]) -> None:
        super().__init__(nodes)
        self.net = net

    def __missing__(self, key: tuple[str, int]) -> Node:
        node = self[key] = Node("%s:%d" % key, Peer("udp", *key))
        node.net = self.net
        return node


def acked(ack_of: Callable[[bytes], bytes], client: Peer = CLIENT_UDP) -> Scenario:
    """A call answered 200, then the client's ACK as ``ack_of`` writes it
    from the 200 (its Route set and the pool's Contact)."""

    def run(fast: bool) -> Network:
        net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=fast, client=client)
        net.nodes = Anywhere(net, net.nodes)
        uac.call(invite(client))
        net.advance()
        (final,) = uac.got(b"SIP/2.0 200 ")
        uac.send(ack_of(final))
        return net

    return run


def everyday_ack(final: bytes, client: Peer = CLIENT_UDP) -> bytes:
    """The ACK a legacy client sends for ``final`` (SIPp's proxy_uac.xml
    writes the same lines)."""
    return client_in_dialog("ACK", final, cseq=1, peer=client)


@pytest.mark.parametrize("client", [CLIENT_UDP, CLIENT_TCP])
def test_an_everyday_ack_takes_the_fast_path_to_the_pool(client: Peer) -> None:
    seen: list[bytes] = []

    def ack_of(final: bytes) -> bytes:
        seen.append(everyday_ack(final, client))
        return seen[-1]

    with taken_by("_fast_ack") as taken:
        fast = alike(acked(ack_of, client))
    assert taken == [seen[0]]  # the run with the fast paths; the other has none
    (at_pool,) = [data for data in sent_data(fast) if data.startswith(b"ACK ")]
    assert b"Route" not in at_pool and b"Max-Forwards: 69\r\n" in at_pool
    assert fast[1]["in_dialog"] == 1


#: Changes to the everyday ACK: (what, into what), applied in turn.
ACK_CHANGES: list[tuple[bytes, bytes]] = [
    (b"192.0.2.10:5062;branch", b"192.0.2.10:65536;branch"),
    (b"Max-Forwards: 70", b"Max-Forwards: 0"),
    (b"Max-Forwards: 70", b"Max-Forwards:  1 "),
    (b"Max-Forwards: 70", b"Max-Forwards: 070"),
    (b"Max-Forwards: 70\r\n", b""),
    (b"Max-Forwards: 70", b"Max-Forwards: 70\r\nMax-Forwards: 70"),
    (b"Content-Length: 0\r\n", b""),
    (b"Content-Length: 0", b"Content-Length: 1"),
    (b"Content-Length: 0", b"l: 0"),
    (b"CSeq: 1 ACK", b"CSeq: 1 BYE"),
    (b"CSeq: 1 ACK", b"CSeq: 1\tACK"),
    (b"Call-ID: ", b"i: "),
    (b"From: ", b"f:"),
    (b"To: ", b"t :"),
    (b";tag=p1", b""),
    (b";tag=p1", b";TAG=p1"),
    (b"Route: ", b"Proxy-Require: ms-x\r\nRoute: "),
    (b"Route: ", b"Require: ms-x\r\nroute:"),
    (b">, <", b">\r\nRoute: <"),
    (b">, <", b">,\r\n <"),
    (b";lr>\r\n", b";lr>, <sip:fe1.contoso.com;lr>\r\n"),
    (b";lr>\r\n", b";lr>\r\nRoute: <sip:10.0.0.7:5060;lr>\r\n"),
    (b"Route: <", b"Route: <sip:fe1.contoso.com;lr>, <"),
    (b"Route: <sip:", b"Route: <sip:x"),
    (
        b".",
        b"!",
    ),
    (b"Route: <", b'Route: "Us" <'),
    (b"ACK sip:", b"ACK sips:"),
    (b"ACK sip:", b"ACK  sip:"),
    (b"ACK sip:pool@192.0.2.21:5060", b"ACK sip:pool@pool.contoso.com"),
    (b"ACK sip:pool@192.0.2.21:5060", b"ACK sip:pool@192.0.2.21:5060;transport=tcp"),
    (b"ACK sip:pool@192.0.2.21:5060", b"ACK sip:pool@[2001:db8::21]"),
    (b"Via: ", b"v: "),
    (b";rport\r\n", b";rport, SIP/2.0/UDP 192.0.2.99;branch=z9hG4bK-x\r\n"),
    (b"branch=z9hG4bK-", b"branch=old-"),
    (b"\r\nVia:", b"\r\nVia: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKfront\r\nVia:"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.lists(st.sampled_from(ACK_CHANGES), max_size=3),
    client=st.sampled_from([CLIENT_UDP, CLIENT_TCP]),
)
def test_generated_acks_are_forwarded_alike_with_and_without_the_fast_path(
    changes: list[tuple[bytes, bytes]], client: Peer
) -> None:
    def ack_of(final: bytes) -> bytes:
        ack = everyday_ack(final, client)
        for old, new in changes:
            ack = ack.replace(old, new, 1)
        return ack

    alike(acked(ack_of, client))


def reordered(ack: bytes, first: tuple[bytes, ...]) -> bytes:
    """``ack`` with the header lines named by ``first`` moved to the top."""
    head, _, body = ack.partition(b"\r\n\r\n")
    start, *lines = head.split(b"\r\n")
    moved = [line for line in lines if line.startswith(first)]
    rest = [line for line in lines if not line.startswith(first)]
    return b"\r\n".join([start, *moved, *rest]) + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    "first", [(b"Route:",), (b"Max-Forwards:", b"Route:"), (b"Max-Forwards:",), (b"CSeq:",)]
)
def test_our_via_goes_before_the_first_via_wherever_the_edited_lines_are(
    first: tuple[bytes, ...],
) -> None:
    seen: list[bytes] = []

    def ack_of(final: bytes) -> bytes:
        seen.append(reordered(everyday_ack(final), first))
        return seen[-1]

    fast = alike(acked(ack_of))
    assert scan_in_dialog(seen[0], 65535, 128) is not None
    (at_pool,) = [data for data in sent_data(fast) if data.startswith(b"ACK ")]
    lines = at_pool.split(b"\r\n")
    theirs = next(i for i, line in enumerate(lines) if line.startswith(b"Via: SIP/2.0/UDP 192."))
    assert lines[theirs - 1].startswith(b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK")
    assert not any(line.startswith(b"Route:") for line in lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 400), junk=st.binary(max_size=3) | st.just(b"\r\n "))
def test_a_damaged_ack_is_forwarded_or_left_alike(cut: int, junk: bytes) -> None:
    def ack_of(final: bytes) -> bytes:
        ack = everyday_ack(final)
        return ack[:cut] + junk + ack[cut:]

    alike(acked(ack_of))


def test_where_an_ack_goes_is_worked_out_again_when_the_listeners_change() -> None:
    """Which Routes name this proxy depends on its listeners: an ACK whose
    Route names an address it no longer listens on is not forwarded."""
    net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=True)
    uac.call(invite())
    net.advance()
    (final,) = uac.got(b"SIP/2.0 200 ")
    uac.send(everyday_ack(final))
    net.advance()
    net.element.set_listeners([Listener("udp", "127.0.0.9", 5070, 0)])
    uac.send(everyday_ack(final).replace(b"z9hG4bK-ACK1", b"z9hG4bK-ACK2"))
    net.advance()
    assert [s.data[:4] for _, s in net.sent].count(b"ACK ") == 1
    assert net.element.counters["forged_route"] == 1  # no Route of ours: dropped


def test_the_pools_ack_goes_back_over_the_clients_flow_alike() -> None:
    """An ACK from the pool (for a 2xx to its own re-INVITE) names the
    pool-facing Route first: it goes to the client over the flow in the
    token, by the fast path as by the general one."""

    def pool_acks(fast: bool) -> Network:
        pool = Pool("pool1", POOL1, (180, 200))
        net, uac = _wire(pool, fast=fast, client=CLIENT_TCP)
        uac.call(invite(CLIENT_TCP))
        net.advance()
        (at_pool,) = pool.got(b"INVITE ")
        ack = pool_in_dialog("ACK", pool, at_pool)
        assert scan_in_dialog(ack, 65535, 128) is not None
        pool.send(ack)
        return net

    fast = alike(pool_acks)
    (to_client,) = [e for e in fast[0] if isinstance(e, tuple) and e[1].startswith(b"ACK ")]
    assert to_client[2] == CLIENT_TCP


def test_an_ack_for_an_invite_still_pending_is_left_to_the_general_path() -> None:
    """An ACK with the branch of an INVITE transaction that has not answered
    finally (§17.2.1: it belongs to that transaction) is the general path's,
    whatever Route it carries."""

    def early_ack(fast: bool) -> Network:
        pool = Pool("pool1", POOL1, (180,))
        net, uac = _wire(pool, fast=fast)
        uac.call(invite())
        net.advance()
        (ringing,) = uac.got(b"SIP/2.0 180 ")
        ack = client_in_dialog("ACK", ringing, cseq=1).replace(b"z9hG4bK-ACK1", b"z9hG4bK-c1")
        assert scan_in_dialog(ack, 65535, 128) is not None
        uac.send(ack)
        return net

    fast = alike(early_ack)
    # the client's ACK went nowhere (the ACK sent is pcproxy's own, for the
    # 487 that Timer C's CANCEL brings, §16.8)
    assert not [d for d in sent_data(fast) if d.startswith(b"ACK ") and b"z9hG4bK-c1" in d]


def test_a_content_length_over_65535_is_left_to_the_general_parser() -> None:
    body = b"x" * 70000
    data = EVERYDAY_200.replace(b"Content-Length: 4\r\n\r\nv=0\n", b"Content-Length: 70000\r\n\r\n")
    data += body
    assert scan_response(data, 1 << 20, 128) is None
    with pytest.raises(SipError):
        parse(data, max_size=1 << 20)


def test_the_name_addr_cache_is_emptied_when_full() -> None:
    from proxy.sip import scan as scanning

    with patch.object(scanning, "NAMES_MAX", 2):
        for n in range(5):
            data = EVERYDAY_200.replace(b"tag=pool-1", b"tag=pool-%d" % n)
            assert agree(data)
            assert len(scanning._everyday) <= 2


# the requests of a dialog: BYE, INFO, UPDATE... -----------------------------------------------
class DialogPool(Pool):
    """A pool that answers the requests of the dialog with ``status``, or
    never (None); the INVITE as scripted."""

    def __init__(self, name: str, target: Target, status: int | None) -> None:
        super().__init__(name, target, (180, 200))
        self.status = status

    def react(self, data: bytes) -> None:
        if data.startswith((b"INVITE ", b"CANCEL ", b"ACK ", b"SIP/2.0 ")):
            super().react(data)
        elif self.status is not None:
            reason = "OK" if self.status == 200 else "Refused"
            self.send(reply_to(data, self.status, reason, to_tag="p1"))


@contextmanager
def taken_by(path: str) -> Iterator[list[bytes]]:
    """The messages the element's fast path ``path`` (a method's name) took
    on, rather than leaving them to the general path."""
    taken: list[bytes] = []
    real = getattr(Element, path)

    def spy(self: Element, data: bytes, *args: object) -> list[Output] | None:
        out: list[Output] | None = real(self, data, *args)
        if out is not None:
            taken.append(data)
        return out

    with patch.object(Element, path, spy):
        yield taken


def fast_in_dialog() -> AbstractContextManager[list[bytes]]:
    return taken_by("_fast_in_dialog")


def in_dialog(
    request_of: Callable[[bytes], bytes],
    *,
    client: Peer = CLIENT_UDP,
    pool: Target = POOL1,
    status: int | None = 200,
    then: Callable[[Network, Client, bytes], None] | None = None,
) -> Scenario:
    """A call answered 200 and ACKed, then the client's request as
    ``request_of`` writes it from the 200; the pool answers it with
    ``status`` (None: never); ``then`` does what follows."""

    def run(fast: bool) -> Network:
        net, uac = _wire(DialogPool("pool1", pool, status), fast=fast, client=client)
        net.nodes = Anywhere(net, net.nodes)
        uac.call(invite(client))
        net.advance()
        (final,) = uac.got(b"SIP/2.0 200 ")
        uac.send(client_in_dialog("ACK", final, cseq=1, peer=client))
        net.advance()
        request = request_of(final)
        uac.send(request)
        if then is not None:
            then(net, uac, request)
        return net

    return run


def everyday(method: str, client: Peer = CLIENT_UDP) -> Callable[[bytes], bytes]:
    return lambda final: client_in_dialog(method, final, cseq=2, peer=client)


@pytest.mark.parametrize("method", ["BYE", "INFO", "UPDATE"])
@pytest.mark.parametrize(
    ("client", "pool"), [(CLIENT_UDP, POOL1), (CLIENT_TCP, POOL1), (CLIENT_UDP, POOL_TCP)]
)
def test_an_everyday_request_of_the_dialog_takes_the_fast_path(
    method: str, client: Peer, pool: Target
) -> None:
    scenario = in_dialog(everyday(method, client), client=client, pool=pool)
    with fast_in_dialog() as taken:
        record = alike(scenario)
    assert [data.split(b" ", 1)[0] for data in taken] == [method.encode()]
    (at_pool,) = [d for d in sent_data(record) if d.startswith(method.encode() + b" ")]
    assert b"Route" not in at_pool and b"Max-Forwards: 69\r\n" in at_pool
    assert at_pool.startswith(taken[0].split(b"\r\n", 1)[0] + b"\r\nVia: SIP/2.0/")
    (answer,) = [
        d for d in sent_data(record) if d.startswith(b"SIP/2.0 200 ") and method.encode() in d
    ]
    assert b"127.0.0.1" not in answer.split(b"\r\n\r\n")[0]  # our Via gone
    assert record[1]["requests." + method] == 1


def test_a_12_kb_info_goes_through_byte_for_byte() -> None:
    body = b"<xccos>" + b"x" * 12000 + b"</xccos>"

    def info(final: bytes) -> bytes:
        data = client_in_dialog("INFO", final, cseq=2, peer=CLIENT_TCP)
        head = data.replace(
            b"Content-Length: 0", b"Content-Type: text/xml\r\nContent-Length: %d" % len(body)
        )
        return head + body

    with fast_in_dialog() as taken:
        record = alike(in_dialog(info, client=CLIENT_TCP))
    assert len(taken) == 1
    (at_pool,) = [d for d in sent_data(record) if d.startswith(b"INFO ")]
    assert at_pool.endswith(b"\r\n\r\n" + body)


def _then_again(delay: float) -> Callable[[Network, Client, bytes], None]:
    def again(net: Network, uac: Client, request: bytes) -> None:
        net.advance(delay)
        uac.send(request)

    return again


def _then_the_pool_fails(net: Network, uac: Client, request: bytes) -> None:
    net.advance(0.1)
    net.apply(net.element.transport_failed(Peer("udp", POOL1.address, POOL1.port), net.now))


#: (pool's answer, what follows): each alike with and without the fast path.
OUTCOMES: dict[str, tuple[int | None, Callable[[Network, Client, bytes], None] | None]] = {
    "answered 200": (200, None),
    "refused with 481": (481, None),
    "refused with 503": (503, None),
    "never answered": (None, None),
    "sent again after the answer": (200, _then_again(0.2)),
    "sent again while unanswered": (None, _then_again(0.5)),
    "its pool unreachable": (None, _then_the_pool_fails),
}


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
@pytest.mark.parametrize("client", [CLIENT_UDP, CLIENT_TCP])
def test_a_bye_ends_alike_with_and_without_the_fast_path(outcome: str, client: Peer) -> None:
    """What follows a fast-forwarded BYE (a retransmission, a silent or
    refusing pool, pcproxy's own final answer and its notes, which parse
    the request only then) is what follows a BYE the general path took."""
    status, then = OUTCOMES[outcome]
    scenario = in_dialog(everyday("BYE", client), client=client, status=status, then=then)
    with fast_in_dialog() as taken:
        record = alike(scenario)
    # a retransmission is the general path's while the server transaction
    # lasts; over TCP it ends with the answer (Timer J is 0, §17.2.2), and a
    # BYE sent again is a new one
    again = outcome == "sent again after the answer" and client.reliable
    assert len(taken) == (2 if again else 1)
    if status is None:  # pcproxy answered for the pool, from the request it parsed then
        (own,) = [d for d in sent_data(record) if d.startswith((b"SIP/2.0 408", b"SIP/2.0 503"))]
        assert b"CSeq: 2 BYE\r\n" in own and b"ms-diagnostics: " in own


def test_the_pools_request_goes_back_over_the_clients_flow_by_the_fast_path() -> None:
    def pool_info(fast: bool) -> Network:
        pool = Pool("pool1", POOL1, (180, 200))
        net, uac = _wire(pool, fast=fast, client=CLIENT_TCP)
        uac.call(invite(CLIENT_TCP))
        net.advance()
        (at_pool,) = pool.got(b"INVITE ")
        pool.send(pool_in_dialog("INFO", pool, at_pool))
        return net

    with fast_in_dialog() as taken:
        record = alike(pool_info)
    assert len(taken) == 1
    (to_client,) = [e for e in record[0] if isinstance(e, tuple) and e[1].startswith(b"INFO ")]
    assert to_client[2] == CLIENT_TCP


def as_bye(text: bytes) -> bytes:
    """A change to the everyday ACK (CSeq 1) made to the everyday BYE (CSeq 2)."""
    return text.replace(b"ACK", b"BYE").replace(b"CSeq: 1 ", b"CSeq: 2 ")


#: The ACK's changes made to a BYE, and a few of the BYE's own.
BYE_CHANGES: list[tuple[bytes, bytes]] = [
    (as_bye(old), as_bye(new)) for old, new in ACK_CHANGES if as_bye(old) != as_bye(new)
] + [
    (b"CSeq: 2 BYE", b"CSeq: 2 INFO"),
    (b"BYE sip:", b"INFO sip:"),
    (b"BYE sip:", b"bye sip:"),
    (b"z9hG4bK-BYE2;rport", b"z9hG4bK-BYE2;maddr=192.0.2.99;rport"),
    (b"z9hG4bK-BYE2;rport", b"z9hG4bK-BYE2"),
    (b"z9hG4bK-BYE2;rport", b"z9hG4bK-BYE2;branch=z9hG4bK-other"),
    (b"192.0.2.10:5062;", b"192.0.2.10:5070;"),
    (b"192.0.2.10:5062;", b"192.0.2.10;"),
    (b"Content-Length: 0\r\n\r\n", b"Content-Length: 3\r\n\r\nabc"),
    (b"Content-Length: 0\r\n\r\n", b"Content-Length: 2\r\n\r\nabc"),
    (b"BYE sip:pool@192.0.2.21:5060", b"BYE sip:pool@192.0.2.21:5060;maddr=x"),
    (b"BYE sip:pool@192.0.2.21:5060", b"BYE sip:pool@192.0.2.21:99999"),
    (b"BYE sip:pool@192.0.2.21:5060", b"BYE sip:"),
    (b"Max-Forwards: 70", b"Max-Forwards 70"),
]


@pytest.mark.parametrize(("old", "new"), BYE_CHANGES)
def test_each_change_to_a_bye_is_forwarded_or_left_alike(old: bytes, new: bytes) -> None:
    def bye_of(final: bytes) -> bytes:
        bye = client_in_dialog("BYE", final, cseq=2)
        assert old in bye
        return bye.replace(old, new, 1)

    alike(in_dialog(bye_of, status=None))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.lists(st.sampled_from(BYE_CHANGES), max_size=3),
    client=st.sampled_from([CLIENT_UDP, CLIENT_TCP]),
    status=st.sampled_from([200, 503, None]),
)
def test_generated_byes_are_forwarded_alike_with_and_without_the_fast_path(
    changes: list[tuple[bytes, bytes]], client: Peer, status: int | None
) -> None:
    def bye_of(final: bytes) -> bytes:
        bye = client_in_dialog("BYE", final, cseq=2, peer=client)
        for old, new in changes:
            bye = bye.replace(old, new, 1)
        return bye

    alike(in_dialog(bye_of, client=client, status=status))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 400), junk=st.binary(max_size=3) | st.just(b"\r\n "))
def test_a_damaged_bye_is_forwarded_or_left_alike(cut: int, junk: bytes) -> None:
    def bye_of(final: bytes) -> bytes:
        bye = client_in_dialog("BYE", final, cseq=2)
        return bye[:cut] + junk + bye[cut:]

    alike(in_dialog(bye_of))


def test_the_everyday_bye_of_the_generated_changes_takes_the_fast_path() -> None:
    """The changes above start from a BYE the fast path reads (so they test it)."""
    with fast_in_dialog() as taken:
        alike(in_dialog(everyday("BYE")))
    assert len(taken) == 1 and b"branch=z9hG4bK-BYE2;rport" in taken[0]


def test_a_context_of_bytes_parses_them_when_asked() -> None:
    """A context the fast path opened gives, when something asks, what the
    general path's holds: the request as received, the request to forward
    (its Route lines, all pcproxy's, gone: §16.4) and the top Via."""
    from proxy.element import Context
    from proxy.sip.transaction import NonInviteServerTransaction, Timers

    net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=True)
    uac.call(invite())
    net.advance()
    (final,) = uac.got(b"SIP/2.0 200 ")
    bye = client_in_dialog("BYE", final, cseq=2)
    txn = NonInviteServerTransaction(("b", "s", "BYE"), CLIENT_UDP, Timers(), "t")
    ctx = Context.of_bytes(1, txn, CLIENT_UDP, bye, CLIENT_UDP, "BYE")
    assert ctx.method == "BYE"
    received = parse(bye)
    assert bytes(ctx.received) == bytes(received) and ctx.received is ctx.received
    assert ctx.via.branch == "z9hG4bK-BYE2" and ctx.via.sent_by == "192.0.2.10:5062"
    assert "route" not in ctx.request.keys
    assert bytes(ctx.request) == bye.replace(
        b"Route: " + field_values(bye, "route")[0] + b"\r\n", b""
    )
    ctx.forget()  # what an answered INVITE's context keeps: nothing to parse
    assert ctx.data == b"" and ctx.received.method == "INVITE" and ctx.via.host


def test_a_request_without_a_route_is_not_read_as_one_of_a_dialog() -> None:
    net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=True)
    uac.call(invite())
    net.advance()
    (final,) = uac.got(b"SIP/2.0 200 ")
    bye = client_in_dialog("BYE", final, cseq=2)
    assert scan_in_dialog(bye, 65535, 128) is not None
    routeless = bye.replace(b"Route: " + field_values(bye, "route")[0] + b"\r\n", b"")
    assert scan_in_dialog(routeless, 65535, 128) is None  # §16.4: nothing of ours to follow


def test_a_strict_routers_request_is_left_to_the_general_path() -> None:
    """A strict router (§16.4, §16.6 step 6) puts the Route it follows in
    the Request-URI and the remote target last in the Route set: the general
    path swaps them back (the target becomes the Request-URI again); the
    fast path leaves such a request alone."""

    def strict(final: bytes) -> bytes:
        bye = client_in_dialog("BYE", final, cseq=2)
        routes = field_values(bye, "route")[0]
        second = routes.split(b", ")[1]
        target = field_values(final, "contact")[0]
        start = b"BYE %s SIP/2.0" % second.strip(b"<>")
        bye = bye.replace(bye.split(b"\r\n", 1)[0], start, 1)
        return bye.replace(routes, routes + b", " + target, 1)

    with fast_in_dialog() as taken:
        record = alike(in_dialog(strict))
    assert not taken
    assert [d for d in sent_data(record) if d.startswith(b"BYE sip:pool@")]


# the INVITE (and SUBSCRIBE) for a proxy endpoint -----------------------------------------------
def fast_starts() -> AbstractContextManager[list[bytes]]:
    return taken_by("_fast_proxy")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_starts_with_the_fast_path(name: str) -> None:
    """The whole calls above (answered, refused, failed over, cancelled...)
    start from an INVITE the fast path took: what follows it (the 486's ACK,
    the CANCEL, the failover) uses the request it parses only then.  The
    pool's responses are read by the fast path too."""
    read: list[int] = []

    def counted(data: bytes, max_size: int, max_headers: int) -> ScannedResponse | None:
        scanned = scan_response(data, max_size, max_headers)
        if scanned is not None:
            read.append(scanned.status)
        return scanned

    with fast_starts() as taken, patch("proxy.element.scan_response", counted):
        alike(SCENARIOS[name])
    assert len(taken) == 1
    assert read, "no response took the fast path"


class Mute(Client):
    """A client that sends nothing but what it is told to: the request it
    sends may be too damaged to build an ACK from."""

    def react(self, data: bytes) -> None:
        pass


def called(request: bytes, client: Peer = CLIENT_UDP, *, mute: bool = False) -> Scenario:
    """``request`` from the client, answered 180, 200 by the pool; the 200
    ACKed and the dialog ended with a BYE, when there is one."""

    def run(fast: bool) -> Network:
        net, uac = _wire(Pool("pool1", POOL1, (180, 200)), fast=fast, client=client)
        if mute:
            net.nodes.pop((client.host, client.port))
            uac = Mute("client", client)
            net.attach(uac)
        net.nodes = Anywhere(net, net.nodes)  # a maddr may name anybody
        uac.call(request)
        net.advance()
        finals = uac.got(b"SIP/2.0 200 ")
        if finals and b"INVITE" in field_values(finals[0], "cseq")[0]:
            uac.send(client_in_dialog("ACK", finals[0], cseq=1, peer=client))
            uac.send(client_in_dialog("BYE", finals[0], cseq=2, peer=client))
        return net

    return run


@pytest.mark.parametrize("client", [CLIENT_UDP, CLIENT_TCP])
def test_an_everyday_invite_is_forwarded_by_the_fast_path(client: Peer) -> None:
    with fast_starts() as taken:
        record = alike(called(invite(client), client))
    assert len(taken) == 1
    (at_pool,) = [d for d in sent_data(record) if d.startswith(b"INVITE ")]
    lines = at_pool.split(b"\r\n")
    assert lines[1].startswith(b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK")
    assert lines[3].startswith(b"Record-Route: <sip:o.")  # after the last Via (§16.6 step 4)
    assert b"Max-Forwards: 69\r\n" in at_pool
    (trying,) = [d for d in sent_data(record) if d.startswith(b"SIP/2.0 100 ")]
    assert b"To: <sip:ocschat@contoso.com>\r\n" in trying  # no tag in a 100


def test_an_everyday_subscribe_is_forwarded_by_the_fast_path() -> None:
    subscribe = (
        invite()
        .replace(b"INVITE", b"SUBSCRIBE")
        .replace(b"Content-Length: 0", b"Event: presence\r\nContent-Length: 0")
    )
    with fast_starts() as taken:
        record = alike(called(subscribe))
    assert len(taken) == 1
    assert not [d for d in sent_data(record) if d.startswith(b"SIP/2.0 100 ")]


def test_a_12_kb_invite_goes_through_byte_for_byte() -> None:
    body = b"v=0\r\n" + b"a=x-ms:" + b"y" * 12000 + b"\r\n"
    request = invite(CLIENT_TCP).replace(
        b"Content-Length: 0\r\n\r\n",
        b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(body),
    )
    with fast_starts() as taken:
        record = alike(called(request + body, CLIENT_TCP))
    assert len(taken) == 1
    (at_pool,) = [d for d in sent_data(record) if d.startswith(b"INVITE ")]
    assert at_pool.endswith(b"\r\n\r\n" + body)


#: Changes to the everyday INVITE: (what, into what).
INVITE_CHANGES: list[tuple[bytes, bytes]] = [
    (b"Max-Forwards: 70\r\n", b""),
    (b"Max-Forwards: 70", b"Max-Forwards: 0"),
    (b"Max-Forwards: 70", b"Max-Forwards:  3 "),
    (b"Max-Forwards: 70", b"Max-Forwards: 70\r\nMax-Forwards: 70"),
    (b"Content-Length: 0\r\n", b""),
    (b"Content-Length: 0\r\n\r\n", b"Content-Length: 4\r\n\r\nv=0\n"),
    (b"Content-Length: 0\r\n\r\n", b"Content-Length: 2\r\n\r\nv=0\n"),
    (b"Content-Length: 0", b"l: 0"),
    (b"To: <sip:ocschat@contoso.com>", b"To: <sip:ocschat@contoso.com>;tag=x"),
    (b"To: <sip:ocschat@contoso.com>", b"To:  sip:ocschat@contoso.com"),
    (b"\r\nVia: ", b"\r\nRecord-Route: <sip:fe.contoso.com;lr>\r\nVia: "),
    (b"\r\nMax-Forwards", b"\r\nRecord-Route: <sip:fe.contoso.com;lr>\r\nMax-Forwards"),
    (b"\r\nContact", b"\r\nrecord-route: <sip:a;lr>\r\nRecord-Route: <sip:b;lr>\r\nContact"),
    (b"\r\nMax-Forwards", b"\r\nRoute: <sip:127.0.0.1:5060;lr>\r\nMax-Forwards"),
    (b"\r\nMax-Forwards", b"\r\nRoute: <sip:fe.contoso.com;lr>\r\nMax-Forwards"),
    (b"\r\nMax-Forwards", b"\r\nProxy-Require: ms-x\r\nMax-Forwards"),
    (b"\r\nMax-Forwards", b"\r\nRequire: ms-x\r\nMax-Forwards"),
    (b"\r\nMax-Forwards", b"\r\nProxy-Authorization: Digest a=b\r\nMax-Forwards"),
    (b"\r\nMax-Forwards", b"\r\nTimestamp: 54\r\nMax-Forwards"),
    (b";rport\r\n", b";rport\r\nVia: SIP/2.0/TCP fe.contoso.com;branch=z9hG4bKfe\r\n"),
    (b";rport\r\n", b";rport\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx.y\r\n"),
    (b";rport\r\n", b";rport, SIP/2.0/TCP fe.contoso.com;branch=z9hG4bKfe\r\n"),
    (b";rport", b";rport;maddr=192.0.2.99"),
    (b";rport", b""),
    (b";rport", b";rport=1;received=192.0.2.10"),
    (b";rport", b";received=192.0.2.99"),
    (b";rport", b";branch=z9hG4bK-second"),
    (b"192.0.2.10:5062", b"192.0.2.10"),
    (b"192.0.2.10:5062", b"Client.Contoso.COM:05062"),
    (b"192.0.2.10:5062", b"[2001:db8::10]:5062"),
    (b"SIP/2.0/UDP 192", b"SIP/2.0/udp 192"),
    (b";tag=a1", b";TAG=a1"),
    (b";tag=a1", b";tag"),
    (b";tag=a1", b";x=1;tag=a2;tag=a3"),
    (b";tag=a1", b""),
    (b"CSeq: 1 INVITE", b"CSeq: 0001 INVITE"),
    (b"CSeq: 1 INVITE", b"CSeq: 1 SUBSCRIBE"),
    (b"Call-ID: ", b"i:   "),
    (b"INVITE sip:", b"INVITE sips:"),
    (b"INVITE sip:ocschat@", b"INVITE sip:OcsChat@"),
    (b"INVITE sip:ocschat@contoso.com", b"INVITE sip:ocschat@contoso.com;transport=tcp"),
    (b"INVITE sip:ocschat@contoso.com", b"INVITE sip:nobody@contoso.com"),
    (b"INVITE sip:ocschat@contoso.com", b"INVITE sip:contoso.com"),
    (b"branch=z9hG4bK-c1", b"branch=c1"),
    (b"Via: ", b"v: "),
    (b"From: ", b"f: "),
    (b"\r\nContact", b"\r\nSupported: ms-sender\r\nms-keep-alive: UAC;hop-hop=yes\r\nContact"),
    (b";rport", b";rport;rport=9;x=1"),
]


@pytest.mark.parametrize(("old", "new"), INVITE_CHANGES)
@pytest.mark.parametrize("client", [CLIENT_UDP, CLIENT_TCP])
def test_each_change_to_an_invite_is_proxied_or_left_alike(
    old: bytes, new: bytes, client: Peer
) -> None:
    request = invite(client)
    # the changes are written for the UDP client's Via
    for udp, tcp in ((b":5062", b":%d" % client.port), (b"/UDP 192", b"/TCP 192")):
        if client.reliable:
            old, new = old.replace(udp, tcp), new.replace(udp, tcp)
    assert old in request
    alike(called(request.replace(old, new, 1), client))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(st.sampled_from(INVITE_CHANGES), max_size=3))
def test_generated_changes_to_an_invite_are_proxied_or_left_alike(
    changes: list[tuple[bytes, bytes]],
) -> None:
    request = invite()
    for old, new in changes:
        request = request.replace(old, new, 1)
    alike(called(request))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 300), junk=st.binary(max_size=3) | st.just(b"\r\n "))
def test_a_damaged_invite_is_proxied_or_left_alike(cut: int, junk: bytes) -> None:
    request = invite()
    alike(called(request[:cut] + junk + request[cut:], mute=True))


def test_an_invite_that_comes_back_is_a_loop_by_either_path() -> None:
    """The INVITE as forwarded, sent to pcproxy again (the pool routes it
    back): its Via below the top is pcproxy's own, so the fast path leaves
    it to §16.3 step 4, which answers 482."""

    def looped(fast: bool) -> Network:
        pool = Pool("pool1", POOL1, ((5.0, 200),))
        net, uac = _wire(pool, fast=fast)
        uac.call(invite())
        net.advance()
        (at_pool,) = pool.got(b"INVITE ")
        uac.send(at_pool)
        return net

    with fast_starts() as taken:
        record = alike(looped)
    assert len(taken) == 1
    assert [d for d in sent_data(record) if d.startswith(b"SIP/2.0 482 ")]
