"""The stateful proxy over an in-memory network and a fake clock (RFC 3261 §16,
§17.1; RFC 3263 §4.3).

A client (a Front End, say) sends to the element; the element forwards to the
pool's servers.  Both sides are simulated nodes on a ``Network`` that carries
every ``Send`` to the node at its address, can drop the first copies of a
message, delay it or duplicate it, answers ``Resolve`` from a table (or lets
the test play DNS), and runs ``handle_timers`` whenever ``next_deadline()``
comes due.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.element import Element, ElementConfig, Listener, MarkFailed, Note, Output, Resolve
from proxy.resolve import Target
from proxy.sip.client_transaction import TIMER_D_UDP
from proxy.sip.peer import Peer, Send

from .sipmsg import (
    CHAT_URI,
    POOL,
    TIMERS,
    ack_for,
    cancel_for,
    field_values,
    make_element,
    reply_to,
    request,
    status_of,
)

T1 = TIMERS.t1
TARGET_TIMEOUT = ElementConfig().target_timeout
TIMER_C = ElementConfig().timer_c
LISTENERS = [Listener("udp", "127.0.0.1", 5060, 0), Listener("tcp", "127.0.0.1", 5060, 0)]
CLIENT_UDP = Peer("udp", "192.0.2.10", 5062)
CLIENT_TCP = Peer("tcp", "192.0.2.10", 50123, 0, 7)
POOL1 = Target(POOL, "192.0.2.21", 5060, "udp")
POOL2 = Target(POOL, "192.0.2.22", 5060, "udp")
POOL_TCP = Target(POOL, "192.0.2.23", 5061, "tcp")
REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 404: "Not Found", 486: "Busy Here"}
REASONS |= {487: "Request Terminated", 503: "Service Unavailable"}
OUR_VIA = re.compile(
    rb"Via: SIP/2\.0/(UDP|TCP) 127\.0\.0\.1:5060;branch=z9hG4bK([0-9a-f]{20}\.)?[0-9a-f]{16,20}"
    rb"(;rport)?"
)
OUR_RECORD_ROUTE = re.compile(
    rb"Record-Route: <sip:o\.[0-9a-f]{20}@127\.0\.0\.1:5060;transport=(udp|tcp);lr>, "
    rb"<sip:i[a-z2-7]+\.[0-9a-f]{20}@127\.0\.0\.1:5060;transport=(udp|tcp);lr>"
)


# the simulated network ---------------------------------------------------------------
@dataclass
class Fault:
    """What happens to messages starting with ``prefix`` on their way to the
    node named ``to`` ("proxy" for the element, None for anywhere)."""

    prefix: bytes
    to: str | None = None
    drop: int = 0  # this many copies are lost, later ones pass
    delay: float = 0.0
    copies: int = 1


class Node:
    """A simulated SIP peer at ``peer``'s address (as the element sees it)."""

    def __init__(self, name: str, peer: Peer) -> None:
        self.name = name
        self.peer = peer
        self.inbox: list[bytes] = []
        self.net: Network | None = None

    def deliver(self, data: bytes) -> None:
        self.inbox.append(data)
        self.react(data)

    def react(self, data: bytes) -> None:
        pass

    def send(self, data: bytes) -> None:
        assert self.net is not None
        self.net.to_proxy(data, self)

    def got(self, prefix: bytes) -> list[bytes]:
        return [m for m in self.inbox if m.startswith(prefix)]

    def statuses(self) -> list[int]:
        return [status_of(m) for m in self.inbox if m.startswith(b"SIP/2.0 ")]


class Client(Node):
    """A UAC: ACKs a non-2xx final itself (§17.1.1.3), answers requests with 200."""

    invite = b""

    def call(self, invite: bytes) -> None:
        self.invite = invite
        self.send(invite)

    def react(self, data: bytes) -> None:
        if data.startswith(b"SIP/2.0 "):
            # (a 400 for a damaged request may echo no CSeq)
            cseq = field_values(data, "cseq")
            if status_of(data) >= 300 and cseq and cseq[0].endswith(b"INVITE"):
                self.send(ack_for(self.invite, data))
        elif not data.startswith(b"ACK "):
            self.send(reply_to(data, 200, "OK"))


class Pool(Node):
    """A pool server (UAS) answering every INVITE with ``script``: statuses,
    or (seconds after the previous one, status).  A retransmitted INVITE gets
    the last response again; a CANCEL gets 200 and, unless the INVITE has a
    final response already, 487 (§9.2) - or nothing when ``deaf_to_cancel``;
    other requests get 200."""

    def __init__(
        self,
        name: str,
        target: Target,
        script: Sequence[int | tuple[float, int]] = (180, 200),
        *,
        deaf_to_cancel: bool = False,
    ) -> None:
        super().__init__(name, Peer(target.transport, target.address, target.port))
        self.target = target
        self.script = [(0.0, s) if isinstance(s, int) else s for s in script]
        self.deaf_to_cancel = deaf_to_cancel
        self.last: dict[bytes, bytes] = {}  # by branch
        self.final: dict[bytes, bytes] = {}  # by branch
        self.responses: list[bytes] = []  # every answer to an INVITE, in order

    def react(self, data: bytes) -> None:
        if data.startswith((b"SIP/2.0 ", b"ACK ")):
            return
        branch = top_branch(data)
        if data.startswith(b"INVITE "):
            if branch in self.last:  # a retransmission: the last response again
                if self.last[branch]:
                    self.send(self.last[branch])
                return
            self.last[branch] = b""
            assert self.net is not None
            at = 0.0
            for delay, status in self.script:
                at += delay
                self.net.later(at, functools.partial(self.answer, data, status))
        elif data.startswith(b"CANCEL "):
            if self.deaf_to_cancel:
                return
            self.send(reply_to(data, 200, "OK", to_tag="p1"))
            invite = next((m for m in self.got(b"INVITE ") if top_branch(m) == branch), None)
            if invite is not None and branch not in self.final:
                self.answer(invite, 487)
        else:
            self.send(reply_to(data, 200, "OK", to_tag="p1"))

    def answer(self, invite: bytes, status: int) -> None:
        branch = top_branch(invite)
        if branch in self.final:
            return
        dialog = 100 < status < 300
        extra: tuple[str, ...] = ("Server: %s" % self.name,)
        if dialog:
            extra += ("Contact: <sip:pool@%s:%d>" % (self.peer.host, self.peer.port),)
        resp = reply_to(
            invite,
            status,
            REASONS[status],
            to_tag="p1" if status > 100 else None,
            extra=extra,
            record_route=dialog,
        )
        self.last[branch] = resp
        self.responses.append(resp)
        if status >= 200:
            self.final[branch] = resp
        self.send(resp)

    def retransmit_final(self) -> None:
        (final,) = self.final.values()
        self.send(final)


class Network:
    """Carries messages between the element and the nodes, in time order."""

    def __init__(self, element: Element, *nodes: Node, dns: list[Target] | None) -> None:
        self.element = element
        self.now = 0.0
        self.nodes: dict[tuple[str, int], Node] = {}
        self.queue: list[tuple[float, int, Callable[[], object]]] = []
        self.order = itertools.count()
        self.faults: list[Fault] = []
        self.dns = dns
        self.sent: list[tuple[float, Send]] = []  # every Send of the element, when made
        self.resolves: list[Resolve] = []
        self.marked: list[Target] = []
        self.notes: list[Note] = []
        for node in nodes:
            self.attach(node)

    def attach(self, node: Node) -> None:
        node.net = self
        self.nodes[node.peer.host, node.peer.port] = node

    def later(self, delay: float, event: Callable[[], object]) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.order), event))

    def carry(self, data: bytes, to: str, deliver: Callable[[bytes], None]) -> None:
        copies, delay = 1, 0.0
        for fault in self.faults:
            if data.startswith(fault.prefix) and fault.to in (None, to):
                if fault.drop:
                    fault.drop -= 1
                    return
                delay += fault.delay
                copies = max(copies, fault.copies)
        for _ in range(copies):
            self.later(delay, functools.partial(deliver, data))

    def to_proxy(self, data: bytes, node: Node) -> None:
        def deliver(data: bytes) -> None:
            self.apply(self.element.receive(data, node.peer, self.now))

        self.carry(data, "proxy", deliver)

    def apply(self, actions: Sequence[Output]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append((self.now, action))
                node = self.nodes[action.peer.host, action.peer.port]
                self.carry(action.data, node.name, node.deliver)
            elif isinstance(action, Resolve):
                self.resolves.append(action)
                if self.dns is not None:
                    self.later(0.0, functools.partial(self.answer_dns, self.dns, action.ref))
            elif isinstance(action, Note):
                self.notes.append(action)
            else:
                assert isinstance(action, MarkFailed)
                self.marked.append(action.target)

    def answer_dns(self, targets: list[Target], ref: int | None = None) -> list[Output]:
        ref = self.resolves[-1].ref if ref is None else ref
        actions = self.element.targets_ready(ref, targets, self.now)
        self.apply(actions)
        return actions

    def run(self, until: float) -> None:
        """Deliver messages and fire the element's timers up to ``until``."""
        while True:
            due = self.element.next_deadline()
            at = self.queue[0][0] if self.queue else None
            if at is not None and at <= until and (due is None or at <= due):
                self.now = max(self.now, at)
                heapq.heappop(self.queue)[2]()
            elif due is not None and due <= until:
                self.now = max(self.now, due)
                self.apply(self.element.handle_timers(self.now))
            else:
                break
        self.now = until

    def advance(self, seconds: float = 0.0) -> None:
        self.run(self.now + seconds)

    def sent_to(self, node: Node, prefix: bytes = b"") -> list[tuple[float, Send]]:
        """What the element sent to ``node`` (before any fault), with times."""
        return [
            (at, s)
            for at, s in self.sent
            if (s.peer.host, s.peer.port) == (node.peer.host, node.peer.port)
            and s.data.startswith(prefix)
        ]


def wire(
    *pools: Pool, client: Peer = CLIENT_UDP, dns: bool = True, **config: object
) -> tuple[Network, Client]:
    """An element in proxy mode between a client and ``pools``; DNS answers
    with the pools' targets in order unless ``dns`` is False."""
    element = make_element(default_mode="proxy", **config)
    element.set_listeners(LISTENERS)
    uac = Client("client", client)
    net = Network(element, uac, *pools, dns=[p.target for p in pools] if dns else None)
    return net, uac


# messages -------------------------------------------------------------------------------
def invite(
    peer: Peer = CLIENT_UDP,
    *,
    branch: str = "z9hG4bK-c1",
    call_id: str = "call-1@client.contoso.com",
    extra: tuple[str, ...] = (),
) -> bytes:
    hostport = "%s:%d" % (peer.host, peer.port)
    via = "SIP/2.0/%s %s;branch=%s;rport" % (peer.transport.upper(), hostport, branch)
    contact = "Contact: <sip:alice@%s;transport=%s>" % (hostport, peer.transport)
    return request(via=via, call_id=call_id, extra=(contact, *extra))


def top_branch(data: bytes) -> bytes:
    m = re.search(rb";branch=([^;,\s]+)", field_values(data, "via")[0])
    assert m is not None
    return m.group(1)


def uris(values: Sequence[bytes]) -> list[bytes]:
    """The <...> URIs of Route/Record-Route values, in order."""
    return [u for v in values for u in re.findall(rb"<[^>]*>", v)]


def client_in_dialog(method: str, final: bytes, *, cseq: int, peer: Peer = CLIENT_UDP) -> bytes:
    """The client's request in the dialog ``final`` (a 2xx) set up (RFC 3261
    §12.2.1.1): Request-URI the remote target, Route the Record-Route reversed."""
    target = field_values(final, "contact")[0].strip(b"<>")
    routes = b", ".join(reversed(uris(field_values(final, "record-route"))))
    lines = [
        b"%s %s SIP/2.0" % (method.encode(), target),
        b"Via: SIP/2.0/%s %s:%d;branch=z9hG4bK-%s%d;rport"
        % (peer.transport.upper().encode(), peer.host.encode(), peer.port, method.encode(), cseq),
        b"Route: " + routes,
        b"Max-Forwards: 70",
        b"From: " + field_values(final, "from")[0],
        b"To: " + field_values(final, "to")[0],
        b"Call-ID: " + field_values(final, "call-id")[0],
        b"CSeq: %d %s" % (cseq, method.encode()),
        b"Content-Length: 0",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def pool_in_dialog(method: str, pool: Pool, invite_at_pool: bytes) -> bytes:
    """The pool's request in the dialog (RFC 3261 §12.2.1.1): Request-URI the
    client's Contact, Route the Record-Route in order (one line per URI)."""
    target = field_values(invite_at_pool, "contact")[0].strip(b"<>")
    routes = [b"Route: " + u for u in uris(field_values(invite_at_pool, "record-route"))]
    lines = [
        b"%s %s SIP/2.0" % (method.encode(), target),
        b"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK-pool-%s;rport"
        % (pool.peer.host.encode(), pool.peer.port, method.encode()),
        *routes,
        b"Max-Forwards: 70",
        b"From: " + field_values(invite_at_pool, "to")[0] + b";tag=p1",
        b"To: " + field_values(invite_at_pool, "from")[0],
        b"Call-ID: " + field_values(invite_at_pool, "call-id")[0],
        b"CSeq: 1 %s" % method.encode(),
        b"Content-Length: 0",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def raw_lines(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Start line, header lines (a folded line with its folds), body."""
    head, _, body = data.partition(b"\r\n\r\n")
    start, *rest = head.split(b"\r\n")
    lines: list[bytes] = []
    for piece in rest:
        if piece[:1] in (b" ", b"\t"):
            lines[-1] += b"\r\n" + piece
        else:
            lines.append(piece)
    return start, lines, body


def key_of(line: bytes) -> bytes:
    name = line.partition(b":")[0].strip().lower()
    return b"via" if name == b"v" else name


def decremented(line: bytes) -> bytes:
    m = re.fullmatch(rb"([^:]*:[ \t]*)([0-9]+)([ \t]*)", line)
    assert m is not None, line
    return m.group(1) + b"%d" % (int(m.group(2)) - 1) + m.group(3)


def assert_forwarded_as_received(
    received: bytes, forwarded: bytes, *, our_routes: int = 0, record_route: bool = True
) -> None:
    """§16.6: ``forwarded`` is ``received`` with a new top Via (ours),
    Max-Forwards minus one (or 70 added), our Record-Route on top of any
    other, and the first ``our_routes`` Route lines (ours) removed."""
    start, lines, body = raw_lines(received)
    fstart, flines, fbody = raw_lines(forwarded)
    assert (fstart, fbody) == (start, body)
    top_via = next(i for i, line in enumerate(flines) if key_of(line) == b"via")
    assert OUR_VIA.fullmatch(flines.pop(top_via)), forwarded
    if record_route:
        first_rr = next(i for i, line in enumerate(flines) if key_of(line) == b"record-route")
        assert OUR_RECORD_ROUTE.fullmatch(flines.pop(first_rr)), forwarded
    expected = []
    routes_left = our_routes
    for line in lines:
        if key_of(line) == b"route" and routes_left:
            routes_left -= 1
            continue
        expected.append(decremented(line) if key_of(line) == b"max-forwards" else line)
    if not any(key_of(line) == b"max-forwards" for line in lines):
        expected.append(b"Max-Forwards: 70")
    assert flines == expected


def without_our_via(response: bytes) -> bytes:
    """A pool response as the client must get it: the top Via line (ours) cut."""
    start, lines, body = raw_lines(response)
    top_via = next(i for i, line in enumerate(lines) if key_of(line) == b"via")
    assert OUR_VIA.fullmatch(lines.pop(top_via)), response
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n" + body


def assert_nothing_left(net: Network) -> None:
    """Every context, transaction and timer of the element has ended."""
    element = net.element
    assert (element.contexts, element.clients, element.transactions) == ({}, {}, {})
    assert element.next_deadline() is None and element.in_flight() == 0


def full_call(
    client: Peer = CLIENT_UDP, *, fast_relay: bool = True
) -> tuple[Network, Client, Pool]:
    """A call the pool answered with 100, 180 and 200; the client has ACKed nothing yet."""
    pool = Pool("pool1", POOL1, (100, 180, 200))
    net, uac = wire(pool, client=client, fast_relay=fast_relay)
    uac.call(invite(client))
    net.advance()
    assert uac.statuses() == [100, 180, 200]
    return net, uac, pool


# 1. byte fidelity ---------------------------------------------------------------------
NAMES = {
    "via": ["Via", "v", "VIA", "via"],
    "from": ["From", "f", "FROM"],
    "to": ["To", "t", "tO"],
    "call-id": ["Call-ID", "i", "call-id", "CALL-ID"],
    "cseq": ["CSeq", "cseq", "CSEQ"],
    "max-forwards": ["Max-Forwards", "max-forwards", "MAX-FORWARDS"],
    "contact": ["Contact", "m"],
    "content-type": ["Content-Type", "c"],
    "content-length": ["Content-Length", "l", "content-LENGTH"],
}
EXTRAS = [
    ("Authorization", 'TLS-DSK qop="auth", realm="SIP Communications Service", '
     'opaque="0A1B2C3D", crand="5a7f", cnum="142", targetname="fe1.contoso.com", '
     'response="602306ac8e4b4f4d8a3b"'),
    ("ms-endpoint-location-data", "NetworkScope;ms-media-location-type=Intranet"),
    ("ms-subnet", "10.1.0.0"),
    ("ms-keep-alive", "UAC;hop-hop=yes"),
    ("ms-text-format", "text/plain; charset=UTF-8;msgr=WAAtAE0ATQBTAC0A"),
    ("Supported", "ms-dialog-route-set-update, timer, histinfo"),
    ("k", "ms-sender"),
    ("User-Agent", "UCCAPI/16.0.4849.1000 OC/16.0.4849.1000 (Skype for Business)"),
    ("X-Unknown-Header", 'a=1; "quoted, with comma" ;b'),
    ("Accept-Language", "en-US"),
    ("Require", "com.microsoft.custom-feature"),
    ("P-Asserted-Identity", "<sip:alice@contoso.com>, <tel:+14255550100>"),
    ("Record-Route", "<sip:fe1.contoso.com:5061;transport=tls;lr;ms-role-rs-from>"),
]  # fmt: skip
SPACINGS = [": ", ":", " : ", ":\t", ":   "]
NEVER_FOLDED = ("via", "cseq", "max-forwards", "content-length")


def _fold(draw: st.DrawFn, value: str) -> str:
    if " " not in value or not draw(st.booleans()):
        return value
    head, _, tail = value.partition(" ")
    return head + draw(st.sampled_from(["\r\n ", "\r\n\t"])) + tail


@st.composite
def client_invites(draw: st.DrawFn) -> bytes:
    """INVITEs to the chat URI as a Front End might write them: compact and
    odd-case names, odd spacing, folded lines, epid, ms-* and unknown headers,
    an Authorization, a body; the top Via has rport (responses go to the source)."""
    body = draw(st.sampled_from([b"", b"v=0\r\no=- 0 0 IN IP4 192.0.2.10\r\ns=-\r\n"]))
    body += draw(st.binary(max_size=40))
    via = "SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-%s;rport" % draw(
        st.text("abcdef0123456789", min_size=4, max_size=12)
    )
    if draw(st.booleans()):
        via += ' , SIP/2.0/TLS fe1.contoso.com:5061;branch=z9hG4bK-fe;ms-internal-info="x,y"'
    from_tag = draw(st.sampled_from(["a1", "9f3c"]))
    fields = [
        ("via", via),
        ("from", '"Alice Smith" <sip:alice@contoso.com>;tag=%s;epid=01010101' % from_tag),
        ("to", "<%s>" % CHAT_URI),
        ("call-id", "%s@client.contoso.com" % draw(st.sampled_from(["c1", "0d1e2f"]))),
        ("cseq", "1 INVITE"),
        ("contact", "<sip:alice@192.0.2.10:5062;transport=udp>;+sip.instance=\"<urn:uuid:1>\""),
        ("content-type", "application/sdp"),
        ("content-length", str(len(body))),
    ]  # fmt: skip
    mf = draw(st.none() | st.integers(1, 70))
    if mf is not None:
        fields.append(("max-forwards", str(mf)))
    fields += draw(st.lists(st.sampled_from(EXTRAS), max_size=5, unique=True))
    fields = draw(st.permutations(fields))
    lines = ["INVITE %s SIP/2.0" % CHAT_URI]
    for key, value in fields:
        name = draw(st.sampled_from(NAMES.get(key, [key])))
        value = value if key in NEVER_FOLDED else _fold(draw, value)
        lines.append(name + draw(st.sampled_from(SPACINGS)) + value)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_invites())
def test_forwarded_invite_and_responses_differ_only_where_rfc3261_16_6_allows(
    data: bytes,
) -> None:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    uac.call(data)
    net.advance()
    (at_pool,) = pool.got(b"INVITE ")
    assert_forwarded_as_received(data, at_pool)
    forwarded = [m for m in uac.inbox if not m.startswith(b"SIP/2.0 100 ")]
    assert forwarded == [without_our_via(r) for r in pool.responses]


@pytest.mark.parametrize(
    "extra",
    [
        ('Authorization: NTLM qop="auth", realm="SIP Communications Service",\r\n'
         '  opaque="ABC", targetname="fe1.contoso.com", crand="1", cnum="2", response="ff"',),
        ("ms-subnet:10.0.0.0", "x-weird :  Value, with, commas", "Ms-Conversation-ID: AdR1"),
        ("v: SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bK-second",),
        ("Record-Route: <sip:fe1.contoso.com;lr>", "Record-Route: <sip:fe2.contoso.com;lr>"),
    ],
)  # fmt: skip
def test_hand_picked_invites_are_forwarded_byte_for_byte(extra: tuple[str, ...]) -> None:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    data = invite(extra=extra)
    uac.call(data)
    net.advance()
    (at_pool,) = pool.got(b"INVITE ")
    assert_forwarded_as_received(data, at_pool)


def test_an_invite_without_max_forwards_gets_70() -> None:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    uac.call(request(via="SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-c1;rport", max_forwards=None))
    net.advance()
    (at_pool,) = pool.got(b"INVITE ")
    assert field_values(at_pool, "max-forwards") == [b"70"]
    assert_forwarded_as_received(uac.invite, at_pool)


def test_record_route_names_the_pool_facing_uri_first_both_loose() -> None:
    net, uac, pool = full_call(CLIENT_TCP)
    (at_pool,) = pool.got(b"INVITE ")
    pool_side, client_side = uris(field_values(at_pool, "record-route"))
    assert pool_side.startswith(b"<sip:o.") and pool_side.endswith(b";transport=udp;lr>")
    assert client_side.startswith(b"<sip:i") and client_side.endswith(b";transport=tcp;lr>")


def test_a_preloaded_route_naming_the_proxy_is_removed() -> None:
    """§16.4: a Front End's Route to pcproxy has no token and is still ours."""
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    data = invite(extra=("Route: <sip:127.0.0.1:5060;transport=udp;lr>",))
    uac.call(data)
    net.advance()
    (at_pool,) = pool.got(b"INVITE ")
    assert field_values(at_pool, "route") == []
    assert_forwarded_as_received(data, at_pool, our_routes=1)


def test_a_provisional_is_forwarded_byte_for_byte_minus_our_via() -> None:
    pool = Pool("pool1", POOL1, (180,))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance()
    (ringing,) = uac.got(b"SIP/2.0 180 ")
    assert ringing == without_our_via(pool.responses[0])


def test_a_message_is_proxied_without_100_or_record_route_and_its_200_forwarded() -> None:
    pool = Pool("pool1", POOL1)
    net, uac = wire(pool)
    data = request(
        "MESSAGE",
        via="SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-m1;rport",
        extra=("Content-Type: text/plain",),
        body=b"hello",
    )
    uac.send(data)
    net.advance(1.0)
    (at_pool,) = pool.got(b"MESSAGE ")
    assert_forwarded_as_received(data, at_pool, record_route=False)
    assert field_values(at_pool, "record-route") == []
    assert uac.statuses() == [200]


# 2. responses ------------------------------------------------------------------------------
def test_only_our_own_100_reaches_the_client_then_180_and_200() -> None:
    net, uac, pool = full_call()
    trying = uac.got(b"SIP/2.0 100 ")
    assert len(trying) == 1 and not field_values(trying[0], "server")
    assert [field_values(r, "server") for r in uac.got(b"SIP/2.0 18")] == [[b"pool1"]]
    assert [field_values(r, "server") for r in uac.got(b"SIP/2.0 200 ")] == [[b"pool1"]]


def test_a_2xx_retransmission_from_the_pool_is_forwarded_again() -> None:
    net, uac, pool = full_call()
    pool.retransmit_final()
    net.advance(1.0)
    first, again = uac.got(b"SIP/2.0 200 ")
    assert again == first


def test_a_486_is_forwarded_and_acked_hop_by_hop() -> None:
    pool = Pool("pool1", POOL1, (180, 486))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(1.0)
    assert uac.statuses() == [100, 180, 486]
    (busy,) = uac.got(b"SIP/2.0 486 ")
    assert busy == without_our_via(pool.final[top_branch(pool.got(b"INVITE ")[0])])
    (ack,) = pool.got(b"ACK ")  # the element's own, not the client's
    assert top_branch(ack) == top_branch(pool.got(b"INVITE ")[0])
    assert len(field_values(ack, "via")) == 1
    assert len(net.sent_to(uac, b"SIP/2.0 486 ")) == 1  # the client's ACK stopped Timer G


def test_the_clients_ack_to_a_486_is_absorbed() -> None:
    pool = Pool("pool1", POOL1, (486,))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance()
    assert uac.got(b"ACK ") == [] and len(uac.inbox) == 2
    sent_before = len(net.sent)
    uac.send(ack_for(uac.invite, uac.got(b"SIP/2.0 486 ")[0]))  # once more
    net.advance(64 * T1)
    assert len(net.sent) == sent_before
    assert len(pool.got(b"ACK ")) == 1


# 3. retransmissions over UDP ---------------------------------------------------------------
def test_lost_invites_to_the_pool_are_resent_at_t1_doubling() -> None:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    net.faults.append(Fault(b"INVITE ", to="pool1", drop=2))
    uac.call(invite())
    net.advance(10.0)
    assert [at for at, _ in net.sent_to(pool, b"INVITE ")] == [0.0, T1, 3 * T1]
    assert len(pool.got(b"INVITE ")) == 1
    assert uac.statuses() == [100, 180, 200]
    assert net.marked == []


def test_a_retransmitted_invite_from_the_client_gets_100_again_and_is_not_forwarded_twice() -> None:
    pool = Pool("pool1", POOL1, (100, (1.0, 180), 200))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(0.5)
    uac.send(uac.invite)
    net.advance(2.0)
    assert uac.statuses() == [100, 100, 180, 200]
    assert len(net.sent_to(pool, b"INVITE ")) == 1


def test_a_retransmitted_invite_after_a_180_gets_the_180_again() -> None:
    pool = Pool("pool1", POOL1, (180, (5.0, 200)))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(1.0)
    uac.send(uac.invite)
    net.advance(1.0)
    assert uac.statuses() == [100, 180, 180]
    first, again = uac.got(b"SIP/2.0 180 ")
    assert again == first
    assert len(net.sent_to(pool, b"INVITE ")) == 1


def test_a_duplicated_invite_is_forwarded_once() -> None:
    pool = Pool("pool1", POOL1, (100, (1.0, 180)))
    net, uac = wire(pool)
    net.faults.append(Fault(b"INVITE ", to="proxy", delay=0.2, copies=2))
    uac.call(invite())
    net.advance(2.0)
    assert uac.statuses() == [100, 100, 180]
    assert len(net.sent_to(pool, b"INVITE ")) == 1
    assert len(net.resolves) == 1


def test_a_duplicated_final_response_is_forwarded_once_and_acked_twice() -> None:
    pool = Pool("pool1", POOL1, (100, 486))
    net, uac = wire(pool)
    net.faults.append(Fault(b"SIP/2.0 ", to="proxy", copies=2))
    uac.call(invite())
    net.advance(5.0)
    assert uac.statuses() == [100, 486]
    assert len(pool.got(b"ACK ")) == 2  # §17.1.1.2: each copy of the final is ACKed


def test_a_duplicated_100_is_not_forwarded() -> None:
    pool = Pool("pool1", POOL1, (100, (1.0, 200)))
    net, uac = wire(pool)
    net.faults.append(Fault(b"SIP/2.0 100 ", to="proxy", copies=3))
    uac.call(invite())
    net.advance(2.0)
    assert uac.statuses() == [100, 200]


def test_a_delayed_200_still_reaches_the_client_once() -> None:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    net.faults.append(Fault(b"SIP/2.0 200 ", to="proxy", delay=1.5))
    uac.call(invite())
    net.advance(1.0)
    assert uac.statuses() == [100, 180]
    net.advance(1.0)
    assert uac.statuses() == [100, 180, 200]


# 4. failover (RFC 3263 §4.3) -----------------------------------------------------------------
def test_a_503_moves_to_the_next_target_with_a_new_branch_and_marks_the_first() -> None:
    first, second = Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, (180, 200))
    net, uac = wire(first, second)
    uac.call(invite())
    net.advance(1.0)
    (to_first,), (to_second,) = first.got(b"INVITE "), second.got(b"INVITE ")
    assert top_branch(to_first) != top_branch(to_second)
    assert net.marked == [POOL1]
    assert len(first.got(b"ACK ")) == 1
    assert uac.statuses() == [100, 180, 200]


def test_a_target_silent_past_target_timeout_is_left_for_the_next() -> None:
    first, second = Pool("pool1", POOL1, ()), Pool("pool2", POOL2, (180, 200))
    net, uac = wire(first, second)
    uac.call(invite())
    net.advance(TARGET_TIMEOUT - 0.01)
    assert second.inbox == []
    net.advance(0.02)
    assert [at for at, _ in net.sent_to(second, b"INVITE ")] == [TARGET_TIMEOUT]
    assert net.marked == [POOL1]
    assert uac.statuses() == [100, 180, 200]


def test_a_tcp_target_whose_connection_fails_is_left_for_the_next() -> None:
    dead, second = Pool("dead", POOL_TCP, ()), Pool("pool2", POOL2, (180, 200))
    net, uac = wire(dead, second)
    uac.call(invite())
    net.advance()
    ((_, sent),) = net.sent_to(dead, b"INVITE ")
    assert sent.peer.transport == "tcp" and second.inbox == []
    net.apply(net.element.transport_failed(sent.peer, net.now))
    net.advance()
    assert net.marked == [POOL_TCP]
    assert len(second.got(b"INVITE ")) == 1
    assert uac.statuses() == [100, 180, 200]


def test_when_every_target_fails_the_client_gets_503_with_retry_after_and_diagnostics() -> None:
    first, second = Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, ())
    net, uac = wire(first, second)
    uac.call(invite())
    net.advance(TARGET_TIMEOUT + 0.1)
    assert uac.statuses() == [100, 503]
    (unavailable,) = uac.got(b"SIP/2.0 503 ")
    assert field_values(unavailable, "server") == []  # ours, not the pool's
    assert field_values(unavailable, "retry-after") == [b"5"]
    (diag,) = field_values(unavailable, "ms-diagnostics")
    assert diag.startswith(b"52005;")
    assert b"udp:192.0.2.21:5060: 503" in diag and b"udp:192.0.2.22:5060: no answer" in diag
    assert net.marked == [POOL1, POOL2]
    net.advance(64 * T1)
    assert_nothing_left(net)


def test_a_silent_tcp_target_gets_one_copy_and_is_left_at_target_timeout() -> None:
    silent, second = Pool("silent", POOL_TCP, ()), Pool("pool2", POOL2, (180, 200))
    net, uac = wire(silent, second)
    uac.call(invite())
    net.advance(TARGET_TIMEOUT + 0.1)
    assert len(silent.got(b"INVITE ")) == 1  # no Timer A over TCP (§17.1.1.2)
    assert net.marked == [POOL_TCP]
    assert uac.statuses() == [100, 180, 200]


def test_a_failed_resolution_is_503_with_diagnostics() -> None:
    net, uac = wire(dns=False)
    uac.call(invite())
    net.advance()
    net.apply(net.element.resolve_failed(net.resolves[0].ref, "NXDOMAIN pcpool", net.now))
    net.advance()
    assert uac.statuses() == [100, 503]
    (diag,) = field_values(uac.got(b"SIP/2.0 503 ")[0], "ms-diagnostics")
    assert diag.startswith(b"52005;") and b"NXDOMAIN pcpool" in diag


def test_the_best_final_response_is_forwarded_a_404_over_a_503() -> None:
    first, second = Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, (404,))
    net, uac = wire(first, second)
    uac.call(invite())
    net.advance(1.0)
    assert uac.statuses() == [100, 404]
    (not_found,) = uac.got(b"SIP/2.0 404 ")
    assert not_found == without_our_via(second.final[top_branch(second.got(b"INVITE ")[0])])


@pytest.mark.parametrize("second_answers", [True, False])
def test_a_branch_left_by_target_timeout_that_rings_late_is_cancelled(
    second_answers: bool,
) -> None:
    """§16.7 step 10: the first target rings after pcproxy moved on to the
    second; whether the second has answered or still rings, the late branch
    is CANCELled and nothing of it reaches the client."""
    slow = Pool("pool1", POOL1, ((TARGET_TIMEOUT + 0.5, 180), (1.0, 200)))
    second = Pool("pool2", POOL2, (180, 200) if second_answers else (180,))
    net, uac = wire(slow, second)
    uac.call(invite())
    net.advance(TARGET_TIMEOUT + 5.0)
    assert [at for at, _ in net.sent_to(slow, b"CANCEL ")] == [TARGET_TIMEOUT + 0.5]
    servers = [field_values(r, "server") for r in uac.inbox if r.startswith(b"SIP/2.0 18")]
    assert servers == [[b"pool2"]]
    assert [field_values(r, "server") for r in uac.got(b"SIP/2.0 200 ")] == (
        [[b"pool2"]] if second_answers else []
    )
    if second_answers:
        net.advance(64 * T1)
        assert_nothing_left(net)


# 5. CANCEL (§16.10) -------------------------------------------------------------------------
def test_cancel_after_180_is_answered_and_sent_on_the_invites_branch() -> None:
    pool = Pool("pool1", POOL1, (180, (10.0, 200)))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(1.0)
    uac.send(cancel_for(uac.invite))
    net.advance(1.0)
    (cancel_ok,) = uac.got(b"SIP/2.0 200 ")
    assert field_values(cancel_ok, "cseq") == [b"1 CANCEL"]
    (forwarded,), (cancel,) = pool.got(b"INVITE "), pool.got(b"CANCEL ")
    assert field_values(cancel, "via") == [field_values(forwarded, "via")[0]]
    assert uac.statuses() == [100, 180, 200, 487]
    (terminated,) = uac.got(b"SIP/2.0 487 ")
    assert terminated == without_our_via(pool.final[top_branch(forwarded)])
    assert len(pool.got(b"ACK ")) == 1  # ours for the 487; the client's was absorbed
    net.advance(20.0)
    assert uac.got(b"SIP/2.0 200 OK") == [cancel_ok]  # the pool's 200 never came
    net.advance(TIMER_D_UDP)
    assert_nothing_left(net)


def test_cancel_before_any_provisional_waits_for_the_180() -> None:
    pool = Pool("pool1", POOL1, ((1.0, 180), (1.0, 200)))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(0.2)
    uac.send(cancel_for(uac.invite))
    net.advance(0.5)
    assert uac.statuses() == [100, 200] and pool.got(b"CANCEL ") == []
    net.advance(2.0)
    assert [at for at, _ in net.sent_to(pool, b"CANCEL ")] == [1.0]
    assert uac.statuses() == [100, 200, 180, 487]


def test_a_cancelled_invite_the_pool_never_ends_is_487_after_64_t1() -> None:
    """§9.1: the pool ignores the CANCEL; 64*T1 later the client gets 487."""
    pool = Pool("pool1", POOL1, (180,), deaf_to_cancel=True)
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(1.0)
    uac.send(cancel_for(uac.invite))
    net.advance(64 * T1 + 1.0)
    assert uac.statuses() == [100, 180, 200, 487]
    assert net.sent_to(uac, b"SIP/2.0 487 ")[0][0] == 1.0 + 64 * T1
    assert net.element.contexts == {}
    assert net.element.clients == {}  # the INVITE branch is given up too, not left ringing


def test_cancel_while_dns_is_pending_is_487_and_nothing_reaches_the_pool() -> None:
    pool = Pool("pool1", POOL1)
    net, uac = wire(pool, dns=False)
    uac.call(invite())
    net.advance()
    uac.send(cancel_for(uac.invite))
    net.advance()
    assert sorted(uac.statuses()) == [100, 200, 487]
    assert net.answer_dns([POOL1]) == []
    net.advance(64 * T1)
    assert pool.inbox == []
    assert net.element.contexts == {}


# 6. in-dialog routing --------------------------------------------------------------------
def test_the_clients_ack_and_bye_follow_the_route_set_to_the_pools_contact() -> None:
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    ack = client_in_dialog("ACK", ok, cseq=1)
    bye = client_in_dialog("BYE", ok, cseq=2)
    uac.send(ack)
    uac.send(bye)
    net.advance(1.0)
    assert len(net.resolves) == 1  # the Contact is an address: no DNS
    (ack_at_pool,) = pool.got(b"ACK ")
    (bye_at_pool,) = pool.got(b"BYE ")
    assert_forwarded_as_received(ack, ack_at_pool, our_routes=1, record_route=False)
    assert_forwarded_as_received(bye, bye_at_pool, our_routes=1, record_route=False)
    assert field_values(bye_at_pool, "max-forwards") == [b"69"]
    assert net.sent_to(pool, b"BYE ")[0][1].peer == Peer("udp", "192.0.2.21", 5060)
    assert uac.statuses()[-1] == 200
    assert field_values(uac.inbox[-1], "cseq") == [b"2 BYE"]
    net.advance(64 * T1)
    assert_nothing_left(net)


@pytest.mark.parametrize("client", [CLIENT_UDP, CLIENT_TCP])
def test_the_pools_info_goes_back_over_the_clients_flow(client: Peer) -> None:
    net, uac, pool = full_call(client)
    (at_pool,) = pool.got(b"INVITE ")
    info = pool_in_dialog("INFO", pool, at_pool)
    pool.send(info)
    net.advance(1.0)
    (info_at_client,) = uac.got(b"INFO ")
    assert {s.peer for _, s in net.sent_to(uac)} == {client}
    assert field_values(info_at_client, "route") == []
    assert_forwarded_as_received(info, info_at_client, our_routes=2, record_route=False)
    assert pool.statuses() == [200]  # the client's 200 came back
    net.advance(64 * T1)
    assert_nothing_left(net)


def _forge(route: bytes) -> bytes:
    """The Route with the last character of the token's MAC changed."""
    at = route.index(b"@") - 1
    return route[:at] + (b"0" if route[at : at + 1] != b"0" else b"1") + route[at + 1 :]


@pytest.mark.parametrize("which", ["client-facing", "pool-facing", "no token"])
def test_a_route_naming_the_proxy_with_a_bad_token_is_403(which: str) -> None:
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    bye = client_in_dialog("BYE", ok, cseq=2)
    client_side, pool_side = uris(field_values(bye, "route"))
    if which == "client-facing":
        client_side = _forge(client_side)
    elif which == "pool-facing":
        pool_side = _forge(pool_side)
    else:
        client_side = b"<sip:127.0.0.1:5060;lr>"
    route = b"Route: " + b", ".join([client_side, pool_side])
    forged = re.sub(rb"Route: [^\r]*", route, bye)
    sent_before = len(net.sent_to(pool))
    uac.send(forged)
    net.advance(1.0)
    assert uac.statuses()[-1] == 403
    assert field_values(uac.inbox[-1], "cseq") == [b"2 BYE"]
    assert len(net.sent_to(pool)) == sent_before


def test_a_route_set_is_judged_alike_every_time_it_comes() -> None:
    """What a Route set comes to is remembered (every request of a dialog
    carries the same): a valid one is forwarded each time, a forged one
    refused each time, in any order."""
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    client_side, pool_side = uris(field_values(client_in_dialog("INFO", ok, cseq=2), "route"))
    forged_route = b"Route: " + b", ".join([_forge(client_side), pool_side])
    for cseq, forged in enumerate([False, True, True, False, True, False], start=2):
        info = client_in_dialog("INFO", ok, cseq=cseq)
        uac.send(re.sub(rb"Route: [^\r]*", forged_route, info) if forged else info)
        net.advance(1.0)
        assert uac.statuses()[-1] == (403 if forged else 200)
        assert field_values(uac.inbox[-1], "cseq") == [b"%d INFO" % cseq]
    assert len(pool.got(b"INFO ")) == 3


@pytest.mark.parametrize("fast_relay", [True, False])
def test_a_route_set_is_judged_again_when_the_listeners_change(fast_relay: bool) -> None:
    """Which Routes name this proxy depends on its listeners: a Route to an
    address it no longer listens on is not its own (481), even when the
    same Route set was forwarded before (by the fast path's memo of where a
    request goes, or by the general path's of what a Route set comes to)."""
    net, uac, pool = full_call(fast_relay=fast_relay)
    (ok,) = uac.got(b"SIP/2.0 200 ")
    uac.send(client_in_dialog("INFO", ok, cseq=2))
    net.advance(1.0)
    assert uac.statuses()[-1] == 200
    net.element.set_listeners([Listener("udp", "127.0.0.9", 5070, 0)])
    uac.send(client_in_dialog("INFO", ok, cseq=3))
    net.advance(1.0)
    assert uac.statuses()[-1] == 481
    assert len(pool.got(b"INFO ")) == 1


def test_the_via_names_the_listeners_of_the_moment() -> None:
    """Which socket a request leaves by is remembered per transport and
    family, for the listeners it was worked out with: after new listeners,
    the next INVITE's Via and Record-Route name the new one."""
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance()
    net.element.set_listeners([Listener("udp", "127.0.0.9", 5070, 0)])
    uac.call(invite(branch="z9hG4bK-c2", call_id="call-2@client.contoso.com"))
    net.advance()
    first, second = pool.got(b"INVITE ")
    assert field_values(first, "via")[0].startswith(b"SIP/2.0/UDP 127.0.0.1:5060;")
    assert field_values(second, "via")[0].startswith(b"SIP/2.0/UDP 127.0.0.9:5070;")
    assert b"@127.0.0.9:5070;transport=udp;lr>" in field_values(second, "record-route")[0]


def test_the_element_memos_are_bounded() -> None:
    """The memos of Contacts, Route sets and ACK ways keep at most MEMO_MAX
    keys (emptied when full) and no key longer than MEMO_LONGEST."""
    from proxy.element import MEMO_LONGEST, MEMO_MAX, _remember

    memo: dict[str, int] = {}
    for n in range(MEMO_MAX):
        _remember(memo, "k%d" % n, n, 2)
    assert len(memo) == MEMO_MAX
    _remember(memo, "one more", 1, 8)
    assert memo == {"one more": 1}
    _remember(memo, "long", 2, MEMO_LONGEST + 1)
    assert "long" not in memo


def test_a_long_route_set_is_worked_out_but_not_remembered() -> None:
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    info = client_in_dialog("INFO", ok, cseq=2)
    long_info = info.replace(b"Route: ", b"Route: <sip:%s.example.com;lr>, " % (b"x" * 2100), 1)
    uac.send(long_info)
    net.advance(1.0)
    assert uac.statuses()[-1] == 481  # the first Route is not ours: not our dialog
    element = net.element
    assert all(sum(map(len, memo[0])) < 2048 for memo in element._routed)
    assert all(sum(map(len, memo[0])) < 2048 for memo in element._ways)
    uac.send(client_in_dialog("INFO", ok, cseq=3))
    net.advance(1.0)
    assert uac.statuses()[-1] == 200
    assert len(element._ways) == 1  # the fast path's
    element.config = replace(element.config, fast_relay=False)
    uac.send(client_in_dialog("INFO", ok, cseq=4))
    net.advance(1.0)
    assert uac.statuses()[-1] == 200
    assert len(element._routed) == 1  # the general path's


# 7. Timer C (§16.8) -------------------------------------------------------------------------
def test_timer_c_cancels_a_branch_that_rang_without_a_final() -> None:
    pool = Pool("pool1", POOL1, (180,))
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(TIMER_C - 1.0)
    assert pool.got(b"CANCEL ") == []
    net.advance(2.0)
    assert [at for at, _ in net.sent_to(pool, b"CANCEL ")] == [TIMER_C]
    assert top_branch(pool.got(b"CANCEL ")[0]) == top_branch(pool.got(b"INVITE ")[0])
    assert uac.statuses() == [100, 180, 487]


def test_a_branch_cancelled_by_timer_c_that_never_ends_still_ends_for_the_client() -> None:
    """§9.1: no final response 64*T1 after the CANCEL: the INVITE is given up
    and the client answered, and the context is gone."""
    pool = Pool("pool1", POOL1, (180,), deaf_to_cancel=True)
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(TIMER_C + 64 * T1 + 1.0)
    assert net.sent_to(pool, b"CANCEL ")[0][0] == TIMER_C
    assert uac.statuses() == [100, 180, 408]
    assert net.sent_to(uac, b"SIP/2.0 408 ")[0][0] == TIMER_C + 64 * T1
    assert net.element.contexts == {}
    assert net.element.clients == {}


def test_a_200_crossing_a_cancel_ends_the_call_without_a_late_408() -> None:
    """The pool answers 200 after pcproxy's CANCEL (§9.1: the CANCEL lost the
    race): the 2xx is the final answer; 64*T1 later nothing else reaches the client."""
    pool = Pool("pool1", POOL1, (180, (5.0, 200)), deaf_to_cancel=True)
    net, uac = wire(pool)
    uac.call(invite())
    net.advance(1.0)
    uac.send(cancel_for(uac.invite))
    net.advance(64 * T1 + 10.0)
    assert uac.statuses() == [100, 180, 200, 200]  # the CANCEL's 200, then the INVITE's
    assert net.element.contexts == {}


def test_an_invite_retransmission_crossing_the_200_is_not_forwarded_again() -> None:
    """RFC 6026 §7.1: absorbed, not proxied as a new request."""
    net, uac, pool = full_call()
    uac.send(uac.invite)
    net.advance(1.0)
    assert len(pool.got(b"INVITE ")) == 1
    assert len(net.resolves) == 1


# 8. loop detection -------------------------------------------------------------------
def test_a_forwarded_invite_fed_back_in_is_482() -> None:
    pool = Pool("pool1", POOL1, ())
    net, uac = wire(pool)
    uac.call(invite())
    net.advance()
    (looped,) = pool.got(b"INVITE ")
    pool.send(looped)
    net.advance()
    assert pool.statuses() == [482]
    assert len(net.resolves) == 1


def test_the_same_call_with_another_request_uri_is_a_spiral_not_a_loop() -> None:
    pool = Pool("pool1", POOL1, ())
    net, uac = wire(pool)
    uac.call(invite())
    net.advance()
    (forwarded,) = pool.got(b"INVITE ")
    spiral = forwarded.replace(b"INVITE sip:ocschat@", b"INVITE sip:OCSChat@", 1)
    pool.send(spiral)
    net.advance()
    assert 482 not in pool.statuses()
    assert len(net.resolves) == 2


# 9. draining ---------------------------------------------------------------------------
def test_draining_refuses_a_new_invite_but_still_forwards_an_in_dialog_bye() -> None:
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    net.element.draining = True
    other = Client("other", Peer("udp", "192.0.2.11", 5062))
    net.attach(other)
    other.call(invite(other.peer, branch="z9hG4bK-o1", call_id="call-2@client.contoso.com"))
    uac.send(client_in_dialog("BYE", ok, cseq=2))
    net.advance(1.0)
    assert other.statuses() == [503]
    assert field_values(other.inbox[0], "retry-after") == [b"5"]
    assert len(pool.got(b"BYE ")) == 1
    assert len(pool.got(b"INVITE ")) == 1
    assert uac.statuses()[-1] == 200


# 10. what the operator hears: Notes and per-endpoint counters ------------------------------
def note_fields(net: Network, event: str) -> list[dict[str, str]]:
    return [dict(n.fields) for n in net.notes if n.event == event]


def test_a_proxied_request_is_counted_for_its_endpoint_and_a_good_call_notes_nothing() -> None:
    net, _, _ = full_call()
    assert net.element.counters["forward_by.sip:ocschat@contoso.com"] == 1
    assert net.notes == []


def test_a_failover_is_noted_with_call_id_branch_method_and_the_target() -> None:
    first, second = Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, (180, 200))
    net, uac = wire(first, second)
    uac.call(invite(extra=("Proxy-Authorization: Digest username=alice, response=secret",)))
    net.advance(1.0)
    (fields,) = note_fields(net, "target_failed")
    assert fields["call_id"] == "call-1@client.contoso.com"
    assert fields["branch"] == "z9hG4bK-c1" and fields["method"] == "INVITE"
    assert fields["target"] == "udp:192.0.2.21:5060" and fields["reason"] == "503"
    assert not any("secret" in value for n in net.notes for _, value in n.fields)


def test_a_pool_nobody_answered_for_is_noted_once_with_every_reason() -> None:
    first, second = Pool("pool1", POOL1, (503,)), Pool("pool2", POOL2, ())
    net, uac = wire(first, second)
    uac.call(invite())
    net.advance(TARGET_TIMEOUT + 0.1)
    assert [n.event for n in net.notes] == ["target_failed", "target_failed", "pool_unreachable"]
    (fields,) = note_fields(net, "pool_unreachable")
    assert fields["call_id"] == "call-1@client.contoso.com" and fields["method"] == "INVITE"
    assert "192.0.2.21:5060: 503" in fields["reasons"]
    assert "192.0.2.22:5060: no answer" in fields["reasons"]


def test_a_failed_resolution_is_noted_with_the_host_and_reason() -> None:
    net, uac = wire(dns=False)
    uac.call(invite())
    net.advance()
    net.apply(net.element.resolve_failed(net.resolves[0].ref, "NXDOMAIN pcpool", net.now))
    (fields,) = note_fields(net, "resolve_failed")
    assert fields["host"] == POOL and fields["reason"] == "NXDOMAIN pcpool"
    assert fields["branch"] == "z9hG4bK-c1"


def test_a_forged_route_is_noted_without_the_token() -> None:
    net, uac, pool = full_call()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    bye = client_in_dialog("BYE", ok, cseq=2)
    client_side, pool_side = uris(field_values(bye, "route"))
    forged = re.sub(
        rb"Route: [^\r]*", b"Route: " + b", ".join([_forge(client_side), pool_side]), bye
    )
    uac.send(forged)
    net.advance(1.0)
    assert uac.statuses()[-1] == 403
    (fields,) = note_fields(net, "forged_route")
    assert fields["method"] == "BYE" and fields["peer"] == "udp:192.0.2.10:5062"
    token = client_side.split(b"@")[0].removeprefix(b"<sip:").decode()
    assert not any(token in value for _, value in net.notes[-1].fields)
