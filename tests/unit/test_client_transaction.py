"""Client transactions, RFC 3261 §17.1, driven against the server machines of §17.2.

A client machine and a server machine are wired by an in-memory link that
can drop, delay and duplicate each message, under a fake clock (aioquic's
``client_and_server()``, h11's ``ConnectionPair``): what one machine sends
arrives at the other as bytes, parsed as the element would parse them.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from proxy.sip.client_transaction import (
    TIMER_D_UDP,
    ClientState,
    ClientTransaction,
    Deliver,
    Event,
    InviteClientTransaction,
    NonInviteClientTransaction,
    ResponseReceived,
    TimedOut,
    Unreachable,
    build_ack,
    client_key,
    response_key,
)
from proxy.sip.message import Request, Response, make_response, parse
from proxy.sip.peer import Peer, Send
from proxy.sip.transaction import (
    AckReceived,
    InviteServerTransaction,
    NonInviteServerTransaction,
    RequestRetransmitted,
    ResponseSent,
    ServerTransaction,
    StartTimer,
    State,
    StopTimer,
    Terminated,
    TimerFired,
    TransactionError,
    TransportFailed,
)

from .sipmsg import TIMERS, request, response

T1, T2, T4 = TIMERS.t1, TIMERS.t2, TIMERS.t4
LATENCY = 0.01
#: (direction, message number in that direction, data) -> delays; [] drops it.
Fate = Callable[[str, int, bytes], list[float]]


def clean(direction: str, n: int, data: bytes) -> list[float]:
    return [LATENCY]


def drop(direction: str, *numbers: int) -> Fate:
    """Drop the messages with these numbers (0 = first) in one direction."""

    def fate(d: str, n: int, data: bytes) -> list[float]:
        return [] if d == direction and n in numbers else [LATENCY]

    return fate


def at(t: float) -> float:
    """A time on the fake clock, rounded as ``World.terminated`` records it."""
    return round(t, 6)


def parse_request(data: bytes) -> Request:
    msg = parse(data)
    assert isinstance(msg, Request)
    return msg


# the fake clock ----------------------------------------------------------------
class Loop:
    """A fake clock with a queue of callbacks; nothing sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()

    def call_later(self, delay: float, fn: Callable[[], None]) -> int:
        handle = next(self._seq)
        heapq.heappush(self._queue, (self.now + delay, handle, fn))
        return handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def pending(self) -> int:
        return sum(1 for _, h, _ in self._queue if h not in self._cancelled)

    def run(self, until: float = 300.0, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self._queue or self._queue[0][0] > until:
                return
            when, handle, fn = heapq.heappop(self._queue)
            if handle in self._cancelled:
                continue
            self.now = when
            fn()
        raise AssertionError("the loop did not settle in %d steps" % max_steps)


@dataclass
class Side:
    """One machine's timers as the element's asyncio shell would keep them."""

    loop: Loop
    timers: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, delay: float, fire: Callable[[str], None]) -> None:
        self.stop(name)
        self.timers[name] = self.loop.call_later(delay, lambda: fire(name))

    def stop(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            self.loop.cancel(handle)

    def stop_all(self) -> None:
        for name in list(self.timers):
            self.stop(name)


# two machines on one link ---------------------------------------------------------
class World:
    """A client transaction towards a UAS whose server transaction answers
    with ``answers`` ((delay after the first request, status) pairs)."""

    def __init__(
        self,
        method: str = "INVITE",
        *,
        transport: str = "udp",
        answers: tuple[tuple[float, int], ...] = ((0.0, 100), (0.1, 486)),
        fate: Fate = clean,
    ) -> None:
        self.loop = Loop()
        self.fate = fate
        self.answers = answers
        self.pool = Peer(transport, "192.0.2.10", 5041)
        self.proxy = Peer(transport, "192.0.2.1", 5060)
        req = parse_request(
            request(
                method,
                branch="z9hG4bK-pc1",
                via="SIP/2.0/%s 192.0.2.1:5060;branch=z9hG4bK-pc1" % transport.upper(),
                extra=("Route: <sip:edge.contoso.com;lr>",),
            )
        )
        machine = InviteClientTransaction if method == "INVITE" else NonInviteClientTransaction
        self.client: ClientTransaction = machine(req, self.pool, TIMERS)
        self.client_side = Side(self.loop)
        self.server: ServerTransaction | None = None
        self.server_side = Side(self.loop)
        self.counts = {"c2s": itertools.count(), "s2c": itertools.count()}
        self.requests_sent: list[tuple[float, bytes]] = []
        self.delivered: list[int] = []
        self.timed_out: list[tuple[float, str]] = []
        self.terminated: list[tuple[float, str]] = []
        self.stray: list[bytes] = []

    # the link
    def transmit(self, direction: str, data: bytes, deliver: Callable[[bytes], None]) -> None:
        for delay in self.fate(direction, next(self.counts[direction]), data):
            self.loop.call_later(delay, lambda: deliver(data))

    # the client's element
    def run_client(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, Send):
                assert action.peer == self.pool
                self.requests_sent.append((self.loop.now, action.data))
                self.transmit("c2s", action.data, self.at_server)
            elif isinstance(action, StartTimer):
                self.client_side.start(action.name, action.delay, self.fire_client)
            elif isinstance(action, StopTimer):
                self.client_side.stop(action.name)
            elif isinstance(action, Deliver):
                self.delivered.append(action.status)
            elif isinstance(action, TimedOut):
                self.timed_out.append((self.loop.now, action.timer))
            elif isinstance(action, Terminated):
                self.terminated.append((round(self.loop.now, 6), action.reason))
                self.client_side.stop_all()
            else:
                raise AssertionError(action)

    def fire_client(self, name: str) -> None:
        self.client_side.timers.pop(name, None)
        self.run_client(self.client.handle(TimerFired(name)))

    def at_client(self, data: bytes) -> None:
        msg = parse(data)
        assert isinstance(msg, Response)
        if response_key(msg) != self.client.key or self.client.state is ClientState.TERMINATED:
            self.stray.append(data)
            return
        self.run_client(self.client.handle(ResponseReceived(msg.status, data)))

    # the server's element
    def run_server(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.transmit("s2c", action.data, self.at_client)
            elif isinstance(action, StartTimer):
                self.server_side.start(action.name, action.delay, self.fire_server)
            elif isinstance(action, StopTimer):
                self.server_side.stop(action.name)
            elif isinstance(action, Terminated):
                self.server_side.stop_all()
            else:
                raise AssertionError(action)

    def fire_server(self, name: str) -> None:
        self.server_side.timers.pop(name, None)
        assert self.server is not None
        self.run_server(self.server.handle(TimerFired(name)))

    def at_server(self, data: bytes) -> None:
        req = parse_request(data)
        server = self.server
        if req.method == "ACK":
            if server is not None and server.state in (State.COMPLETED, State.CONFIRMED):
                self.run_server(server.handle(AckReceived()))
            else:
                self.stray.append(data)
            return
        if server is None:
            machine = (
                InviteServerTransaction if req.method == "INVITE" else NonInviteServerTransaction
            )
            self.server = machine(("k",), self.proxy, TIMERS, "uas-tag")
            for delay, status in self.answers:
                self.loop.call_later(delay, functools.partial(self.answer, req, status))
        elif server.state is State.TERMINATED:
            self.stray.append(data)
        else:
            self.run_server(server.handle(RequestRetransmitted()))

    def answer(self, req: Request, status: int) -> None:
        assert self.server is not None
        if self.server.state is State.TERMINATED:
            return
        data = bytes(make_response(req, status, to_tag="uas-tag"))
        self.run_server(self.server.handle(ResponseSent(status, data)))

    def go(self, until: float = 300.0) -> World:
        self.run_client(self.client.start())
        self.loop.run(until)
        return self

    # reading the record
    def sends(self, method: str) -> list[float]:
        return [t for t, d in self.requests_sent if d.startswith(method.encode() + b" ")]


# INVITE, §17.1.1 ---------------------------------------------------------------
def test_invite_answered_with_486_is_acknowledged_and_ends_after_timer_d() -> None:
    w = World().go()
    assert w.delivered == [100, 486]
    assert len(w.sends("INVITE")) == 1
    assert len(w.sends("ACK")) == 1
    assert w.server is not None and w.server.state is State.TERMINATED
    assert w.client.state is ClientState.TERMINATED
    assert w.terminated == [(at(0.12 + TIMER_D_UDP), "done")]
    assert w.timed_out == [] and w.stray == []
    assert w.loop.pending() == 0


def test_dropped_invite_is_recovered_by_timer_a() -> None:
    w = World(fate=drop("c2s", 0)).go()
    assert w.sends("INVITE") == [0.0, T1]
    assert w.delivered == [100, 486]
    assert w.server is not None and w.server.state is State.TERMINATED


def test_dropped_final_response_is_recovered_by_the_servers_timer_g() -> None:
    w = World(fate=drop("s2c", 1)).go()
    assert w.delivered == [100, 486]
    assert len(w.sends("ACK")) == 1
    assert w.server is not None and w.server.state is State.TERMINATED


def test_dropped_ack_is_resent_for_the_retransmitted_final_not_delivered_twice() -> None:
    w = World(fate=drop("c2s", 1)).go()
    assert w.delivered == [100, 486]
    acks = w.sends("ACK")
    assert len(acks) == 2
    assert acks[1] == pytest.approx(0.11 + T1 + LATENCY)
    assert w.server is not None and w.server.state is State.TERMINATED


def test_duplicated_messages_are_absorbed_by_both_machines() -> None:
    w = World(fate=lambda d, n, data: [LATENCY, 2 * LATENCY]).go()
    finals = [s for s in w.delivered if s >= 200]
    assert finals == [486]
    assert set(w.delivered) == {100, 486}
    assert len(w.sends("INVITE")) == 1
    assert w.server is not None and w.server.state is State.TERMINATED


def test_slow_link_makes_timer_a_fire_and_the_server_resends_its_provisional() -> None:
    w = World(answers=((0.0, 100), (2.0, 486)), fate=lambda d, n, data: [0.4]).go()
    assert w.sends("INVITE") == [0.0, T1]
    assert w.delivered == [100, 100, 486]


def test_invite_2xx_ends_the_client_transaction_at_once() -> None:
    w = World(answers=((0.0, 180), (0.1, 200))).go()
    assert w.delivered == [180, 200]
    assert w.sends("ACK") == []
    assert w.terminated == [(at(0.12), "2xx received")]


def test_timer_b_fires_when_the_pool_never_answers() -> None:
    w = World(fate=drop("c2s", *range(100))).go()
    assert w.sends("INVITE") == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert w.timed_out == [(64 * T1, "B")]
    assert w.delivered == [] and w.server is None
    assert w.loop.pending() == 0


def test_proceeding_stops_retransmitting_and_timer_b() -> None:
    w = World(answers=((0.0, 180), (100.0, 486))).go()
    assert w.sends("INVITE") == [0.0]
    assert w.timed_out == []
    assert w.delivered == [180, 486]


def test_tcp_invite_has_no_retransmission_only_timer_b() -> None:
    w = World(transport="tcp", fate=drop("c2s", *range(100))).go()
    assert w.sends("INVITE") == [0.0]
    assert w.timed_out == [(64 * T1, "B")]


def test_tcp_invite_final_response_terminates_without_timer_d() -> None:
    w = World(transport="tcp").go()
    assert w.delivered == [100, 486]
    assert len(w.sends("ACK")) == 1
    assert w.terminated == [(at(0.12), "final response acknowledged")]


# non-INVITE, §17.1.2 -----------------------------------------------------------
def test_non_invite_timer_e_doubles_up_to_t2_then_timer_f_fires() -> None:
    w = World("OPTIONS", fate=drop("c2s", *range(100))).go()
    expected = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert w.sends("OPTIONS") == expected
    assert w.timed_out == [(64 * T1, "F")]
    assert w.loop.pending() == 0


def test_non_invite_in_proceeding_retransmits_every_t2() -> None:
    w = World("OPTIONS", answers=((0.0, 100), (10.0, 200))).go()
    assert w.sends("OPTIONS") == [0.0, 0.5, 0.5 + T2, 0.5 + 2 * T2]
    assert w.delivered == [100, 100, 100, 100, 200]


def test_non_invite_dropped_final_is_recovered_by_retransmission() -> None:
    w = World("OPTIONS", answers=((0.0, 200),), fate=drop("s2c", 0)).go()
    assert w.sends("OPTIONS") == [0.0, T1]
    assert w.delivered == [200]
    assert w.terminated == [(at(T1 + 2 * LATENCY + T4), "done")]


def test_non_invite_duplicated_final_is_delivered_once() -> None:
    w = World("OPTIONS", answers=((0.0, 200),), fate=lambda d, n, data: [LATENCY] * 3).go()
    assert w.delivered == [200]


def test_non_invite_over_tcp_has_no_retransmission_and_no_timer_k() -> None:
    w = World("OPTIONS", transport="tcp", answers=((0.0, 200),)).go()
    assert w.sends("OPTIONS") == [0.0]
    assert w.terminated == [(at(2 * LATENCY), "final response received")]
    w2 = World("OPTIONS", transport="tcp", fate=drop("c2s", 0)).go()
    assert w2.sends("OPTIONS") == [0.0]
    assert w2.timed_out == [(64 * T1, "F")]


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
@pytest.mark.parametrize("seed", range(150))
def test_lossy_link_ends_with_one_final_response_or_a_timeout(method: str, seed: int) -> None:
    rng = random.Random(seed)

    def fate(direction: str, n: int, data: bytes) -> list[float]:
        if rng.random() < 0.3:
            return []
        copies = 2 if rng.random() < 0.15 else 1
        return [rng.uniform(0.0, 0.3) for _ in range(copies)]

    answers = ((0.0, 100), (rng.uniform(0, 3), rng.choice([200, 404, 486, 503])))
    w = World(method, answers=answers, fate=fate).go()
    finals = [s for s in w.delivered if s >= 200]
    if method == "INVITE" and not finals and not w.timed_out:
        # every copy of the final was lost after a provisional: an INVITE
        # transaction waits in PROCEEDING (no Timer B there, figure 5) until
        # the proxy's Timer C cancels it (§16.6 step 11)
        assert w.client.state is ClientState.PROCEEDING and 100 in w.delivered
    else:
        assert len(finals) + len(w.timed_out) == 1
        assert w.client.state is ClientState.TERMINATED
    assert w.server is None or w.server.state is State.TERMINATED
    assert w.loop.pending() == 0


# transport failure, §17.1.4 ------------------------------------------------------
@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
def test_transport_failure_reports_unreachable_and_terminates(method: str) -> None:
    w = World(method)
    w.client.start()
    actions = w.client.handle(TransportFailed())
    assert Unreachable("transport error") in actions
    assert actions[-1] == Terminated("transport error")
    assert w.client.state is ClientState.TERMINATED


# the tables ------------------------------------------------------------------
EVENTS: list[Event] = [
    ResponseReceived(100, b""),
    TimerFired("A"),
    TransportFailed(),
]
MACHINES: list[type[ClientTransaction]] = [InviteClientTransaction, NonInviteClientTransaction]


def started(machine: type[ClientTransaction], state: ClientState) -> ClientTransaction:
    method = "INVITE" if machine is InviteClientTransaction else "OPTIONS"
    txn = machine(parse_request(request(method)), Peer("udp", "192.0.2.10", 5041), TIMERS)
    txn.start()
    txn.state = state
    return txn


@pytest.mark.parametrize(
    ("machine", "state", "event"),
    [
        pytest.param(m, s, e, id="%s-%s-%s" % (m.__name__[:9], s.name, type(e).__name__))
        for m, s, e in itertools.product(MACHINES, ClientState, EVENTS)
        if (s, type(e)) not in m.TRANSITIONS
    ],
)
def test_pair_not_in_the_table_is_a_transaction_error(
    machine: type[ClientTransaction], state: ClientState, event: Event
) -> None:
    txn = started(machine, state)
    with pytest.raises(TransactionError) as info:
        txn.handle(event)
    assert info.value.status == 500
    assert txn.state is state


def test_terminated_accepts_nothing_and_each_machine_has_its_own_states() -> None:
    for machine in MACHINES:
        assert not [k for k in machine.TRANSITIONS if k[0] is ClientState.TERMINATED]
    assert not [k for k in InviteClientTransaction.TRANSITIONS if k[0] is ClientState.TRYING]
    assert not [k for k in NonInviteClientTransaction.TRANSITIONS if k[0] is ClientState.CALLING]


@pytest.mark.parametrize(
    ("machine", "state", "timer"),
    [
        (InviteClientTransaction, ClientState.CALLING, "E"),
        (InviteClientTransaction, ClientState.COMPLETED, "A"),
        (NonInviteClientTransaction, ClientState.TRYING, "A"),
        (NonInviteClientTransaction, ClientState.COMPLETED, "E"),
    ],
)
def test_a_timer_the_state_does_not_run_is_a_transaction_error(
    machine: type[ClientTransaction], state: ClientState, timer: str
) -> None:
    txn = started(machine, state)
    with pytest.raises(TransactionError):
        txn.handle(TimerFired(timer))
    assert txn.state is state


def test_events_before_start_and_a_second_start_are_errors() -> None:
    txn = InviteClientTransaction(parse_request(request()), Peer("udp", "h", 1), TIMERS)
    with pytest.raises(TransactionError):
        txn.handle(ResponseReceived(100, b""))
    txn.start()
    with pytest.raises(TransactionError):
        txn.start()


def test_machine_refuses_the_wrong_method() -> None:
    with pytest.raises(TransactionError):
        InviteClientTransaction(parse_request(request("OPTIONS")), Peer("udp", "h", 1), TIMERS)
    with pytest.raises(TransactionError):
        NonInviteClientTransaction(parse_request(request("INVITE")), Peer("udp", "h", 1), TIMERS)
    # the fast path's form: the bytes and the branch
    for cls, wrong in ((InviteClientTransaction, "OPTIONS"), (NonInviteClientTransaction, "ACK")):
        with pytest.raises(TransactionError):
            cls(request(wrong), Peer("udp", "h", 1), TIMERS, "z9hG4bK-1")
    with pytest.raises(TransactionError):  # no method at all
        InviteClientTransaction(b"INVITE", Peer("udp", "h", 1), TIMERS, "z9hG4bK-1")


def test_a_machine_of_bytes_parses_its_request_only_when_asked() -> None:
    data = request()
    txn = InviteClientTransaction(data, Peer("udp", "h", 1), TIMERS, "z9hG4bK-given")
    assert txn._request is None and txn.data == data and txn.branch == "z9hG4bK-given"
    assert txn.request.method == "INVITE" and txn._request is txn.request
    told = InviteClientTransaction(parse_request(data), Peer("udp", "h", 1), TIMERS)
    assert told.branch == told.request.top_via().branch  # read from the request


def test_start_arms_retransmission_only_over_udp() -> None:
    req = parse_request(request())
    udp = InviteClientTransaction(req, Peer("udp", "h", 1), TIMERS).start()
    tcp = InviteClientTransaction(req, Peer("tls", "h", 1), TIMERS).start()
    assert [a for a in udp if isinstance(a, StartTimer)] == [
        StartTimer("A", T1),
        StartTimer("B", 64 * T1),
    ]
    assert [a for a in tcp if isinstance(a, StartTimer)] == [StartTimer("B", 64 * T1)]


# the ACK, §17.1.1.3 --------------------------------------------------------------
def test_ack_copies_the_invite_and_takes_to_from_the_response() -> None:
    invite = parse_request(
        request(
            via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-top, "
            "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK-x",
            extra=(
                "Route: <sip:a.contoso.com;lr>",
                "Route: <sip:b.contoso.com;lr>",
                "Contact: <sip:alice@10.0.0.9>",
            ),
            cseq=42,
        )
    )
    final = bytes(make_response(invite, 486, to_tag="uas-9"))
    ack = parse_request(build_ack(invite, final))
    assert ack.method == "ACK" and ack.uri == invite.uri
    assert ack.get_all("via") == ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-top"]
    assert ack.get_all("route") == ["<sip:a.contoso.com;lr>", "<sip:b.contoso.com;lr>"]
    assert ack.get("from") == invite.get("from")
    assert ack.get("call-id") == invite.get("call-id")
    assert ack.to_addr is not None and ack.to_addr.tag == "uas-9"
    assert ack.cseq is not None and (ack.cseq.number, ack.cseq.method) == (42, "ACK")
    assert ack.get("contact") is None and ack.body == b""


def test_ack_for_bytes_that_are_no_response_is_a_transaction_error() -> None:
    invite = parse_request(request())
    with pytest.raises(TransactionError):
        build_ack(invite, b"garbage")
    with pytest.raises(TransactionError):
        build_ack(invite, request())


# matching, §17.1.3 ----------------------------------------------------------------
def test_response_matches_by_top_via_branch_and_cseq_method() -> None:
    txn = InviteClientTransaction(
        parse_request(request(branch="z9hG4bK-m1")), Peer("udp", "h", 1), TIMERS
    )
    ok = parse(response(via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-m1"))
    other_method = parse(
        response(via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-m1", cseq_method="CANCEL")
    )
    other_branch = parse(response(via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-m2"))
    no_branch = parse(response(via="SIP/2.0/UDP 127.0.0.1:5060"))
    assert isinstance(ok, Response) and isinstance(other_method, Response)
    assert isinstance(other_branch, Response) and isinstance(no_branch, Response)
    assert response_key(ok) == txn.key == ("z9hG4bK-m1", "INVITE")
    assert response_key(other_method) == ("z9hG4bK-m1", "CANCEL") != txn.key
    assert response_key(other_branch) != txn.key
    assert response_key(no_branch) is None
    assert client_key("z9hG4bK-m1", "ACK") == txn.key


def test_completed_invite_absorbs_a_late_provisional_and_reacks_a_final() -> None:
    w = World()
    w.client.start()
    final = bytes(make_response(w.client.request, 486, to_tag="t"))
    first = w.client.handle(ResponseReceived(486, final))
    assert w.client.state is ClientState.COMPLETED
    ack = next(a for a in first if isinstance(a, Send))
    assert w.client.handle(ResponseReceived(180, b"")) == []
    assert w.client.handle(ResponseReceived(486, final)) == [ack]


def test_response_without_a_parsed_via_is_matched_from_its_header_or_not_at_all() -> None:
    parsed = parse(response(via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-m1"))
    assert isinstance(parsed, Response)
    parsed.via = None
    assert response_key(parsed) == ("z9hG4bK-m1", "INVITE")
    assert response_key(Response(status=200)) is None
