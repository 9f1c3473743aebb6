"""The stateful proxy under any interleaving of what its peers and its shell
can do (RFC 3261 §16, §17): a Hypothesis state machine.

Clients send requests, retransmit them, CANCEL and ACK them; the shell answers
``Resolve`` late, with targets or a failure; pool servers answer any forwarded
request with any status, or duplicate it; connections fail; time jumps; bytes
arrive garbled.  Whatever happens, the element only ever returns its four
actions, answers the client with well-formed responses, and, once every peer
has gone quiet and every timer has run, holds no transaction, context or
deadline: nothing leaks.
"""

from __future__ import annotations

import re

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.element import Element, ElementConfig, Listener, MarkFailed, Note, Output, Resolve
from proxy.resolve import Target
from proxy.sip.peer import Peer, Send

from .sipmsg import (
    CHAT_URI,
    POOL,
    TIMERS,
    ack_for,
    cancel_for,
    endpoint,
    reply_to,
    request,
    snapshot,
    status_of,
)
from .test_properties import NEAR_SIP

LISTENERS = [Listener("udp", "127.0.0.1", 5060, 0), Listener("tcp", "127.0.0.1", 5060, 0)]
CLIENTS = [Peer("udp", "192.0.2.10", 5062), Peer("tcp", "192.0.2.11", 50123, 0, 7)]
TARGETS = [
    Target(POOL, "192.0.2.21", 5060, "udp"),
    Target(POOL, "192.0.2.22", 5060, "udp"),
    Target(POOL, "192.0.2.23", 5061, "tcp"),
]
POOL_PEERS = {(t.address, t.port): Peer(t.transport, t.address, t.port) for t in TARGETS}
OUR_CALL_ID = re.compile(rb"chaos-\d+@client")
POOL_HOSTS = {t.address for t in TARGETS}
METHODS = ["INVITE", "INVITE", "SUBSCRIBE", "MESSAGE", "OPTIONS", "INFO"]
STATUSES = [100, 180, 183, 200, 202, 302, 404, 408, 486, 487, 500, 503, 603]


class ProxyChaos(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.element = Element(
            snapshot(endpoint()), ElementConfig(timers=TIMERS, default_mode="proxy")
        )
        self.element.set_listeners(LISTENERS)
        self.now = 0.0
        self.sent: list[tuple[bytes, Peer]] = []  # what the clients sent, with its source
        self.finals: list[tuple[bytes, bytes]] = []  # (request, final response) at a client
        self.pending: list[Resolve] = []
        self.forwarded: list[tuple[bytes, Peer]] = []  # what reached a pool server
        self.calls = 0

    # carrying out the element's actions ----------------------------------------
    def take(self, actions: list[Output]) -> None:
        assert isinstance(actions, list)
        for action in actions:
            if isinstance(action, Resolve):
                assert action.host == POOL
                self.pending.append(action)
            elif isinstance(action, MarkFailed):
                assert action.target in TARGETS
            elif isinstance(action, Note):  # for the log: never a header value
                assert all(isinstance(v, str) for _, v in action.fields)
            else:
                assert type(action) is Send, action
                self.deliver(action)

    def deliver(self, send: Send) -> None:
        data, peer = send.data, send.peer
        assert data.endswith(b"\r\n\r\n") or b"Content-Length: " in data
        if (peer.host, peer.port) in POOL_PEERS:
            self.forwarded.append((data, POOL_PEERS[peer.host, peer.port]))
            return
        if peer.host in POOL_HOSTS:  # an answer to a request a pool server sent
            assert data.startswith(b"SIP/2.0 "), data
            return
        # over UDP a response goes to the Via's sent-by port (§18.2.2)
        assert peer.host in {c.host for c in CLIENTS}, peer
        if data.startswith(b"SIP/2.0 "):
            status = status_of(data)
            assert 100 <= status <= 699
            found = OUR_CALL_ID.search(data)
            if status >= 200 and found is not None:
                for req, _ in self.sent:
                    if found.group() in req and req.startswith(b"INVITE "):
                        self.finals.append((req, data))
                        break

    # the clients -----------------------------------------------------------------
    @rule(method=st.sampled_from(METHODS), client=st.sampled_from(CLIENTS))
    def client_sends(self, method: str, client: Peer) -> None:
        self.calls += 1
        n = self.calls
        data = request(
            method,
            CHAT_URI,
            branch="z9hG4bK-c%d" % n,
            call_id="chaos-%d@client" % n,
            from_="<sip:user%d@contoso.com>;tag=f%d" % (n, n),
        )
        self.sent.append((data, client))
        self.take(self.element.receive(data, client, self.now))

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1 << 16))
    def client_retransmits(self, pick: int) -> None:
        data, client = self.sent[pick % len(self.sent)]
        self.take(self.element.receive(data, client, self.now))

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1 << 16))
    def client_cancels(self, pick: int) -> None:
        data, client = self.sent[pick % len(self.sent)]
        if data.startswith(b"INVITE "):
            self.take(self.element.receive(cancel_for(data), client, self.now))

    @precondition(lambda self: self.finals)
    @rule(pick=st.integers(0, 1 << 16))
    def client_acks(self, pick: int) -> None:
        invite, final = self.finals[pick % len(self.finals)]
        client = next(c for d, c in self.sent if d == invite)
        self.take(self.element.receive(ack_for(invite, final), client, self.now))

    @rule(data=NEAR_SIP, client=st.sampled_from(CLIENTS))
    def client_sends_garbage(self, data: bytes, client: Peer) -> None:
        self.take(self.element.receive(data, client, self.now))

    # the shell -------------------------------------------------------------------
    @precondition(lambda self: self.pending)
    @rule(
        pick=st.integers(0, 1 << 16),
        plan=st.lists(st.sampled_from(TARGETS), max_size=3, unique=True),
    )
    def dns_answers(self, pick: int, plan: list[Target]) -> None:
        action = self.pending.pop(pick % len(self.pending))
        if plan:
            self.take(self.element.targets_ready(action.ref, plan, self.now))
        else:
            self.take(self.element.resolve_failed(action.ref, "NXDOMAIN", self.now))

    @rule(server=st.sampled_from(TARGETS))
    def connection_fails(self, server: Target) -> None:
        peer = POOL_PEERS[server.address, server.port]
        self.take(self.element.transport_failed(peer, self.now))

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5, 4.0, 32.0, 200.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.take(self.element.handle_timers(self.now))

    # the pool ------------------------------------------------------------------------
    @precondition(lambda self: self.forwarded)
    @rule(pick=st.integers(0, 1 << 16), status=st.sampled_from(STATUSES), dup=st.booleans())
    def pool_answers(self, pick: int, status: int, dup: bool) -> None:
        data, peer = self.forwarded[pick % len(self.forwarded)]
        if data.startswith((b"SIP/2.0 ", b"ACK ")):
            return
        answer = reply_to(
            data, status, "Whatever", to_tag="p1" if status > 100 else None, record_route=True
        )
        for _ in range(2 if dup else 1):
            self.take(self.element.receive(answer, peer, self.now))

    @rule(data=NEAR_SIP, server=st.sampled_from(TARGETS))
    def pool_sends_garbage(self, data: bytes, server: Target) -> None:
        self.take(self.element.receive(data, POOL_PEERS[server.address, server.port], self.now))

    # what must always hold --------------------------------------------------------
    @invariant()
    def deadline_is_not_in_the_past_after_timers_ran(self) -> None:
        at = self.element.next_deadline()
        assert at is None or isinstance(at, float)

    def teardown(self) -> None:
        """Answer every outstanding query, then let every timer run: nothing is left."""
        while self.pending:
            action = self.pending.pop()
            self.take(self.element.resolve_failed(action.ref, "shutdown", self.now))
        for _ in range(6):  # Timer C (181 s) and whatever it starts
            self.now += 200.0
            self.take(self.element.handle_timers(self.now))
            while self.pending:
                action = self.pending.pop()
                self.take(self.element.resolve_failed(action.ref, "shutdown", self.now))
        element = self.element
        assert element.transactions == {}, list(element.transactions)
        assert element.clients == {}, list(element.clients)
        assert element.contexts == {}, list(element.contexts)
        assert element.in_flight() == 0
        assert element.next_deadline() is None


ProxyChaos.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestProxyChaos = ProxyChaos.TestCase
