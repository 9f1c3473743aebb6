"""Server transactions, RFC 3261 §17.2: the tables, the timers, the retransmissions."""

from __future__ import annotations

import itertools

import pytest

from proxy.sip.peer import Send
from proxy.sip.transaction import (
    AckReceived,
    Event,
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
    transaction_key,
)

from .sipmsg import TCP_PEER, TIMERS, UDP_PEER

T1, T2, T4 = TIMERS.t1, TIMERS.t2, TIMERS.t4
R100 = b"SIP/2.0 100 Trying\r\n\r\n"
R200 = b"SIP/2.0 200 OK\r\n\r\n"
R302 = b"SIP/2.0 302 Moved Temporarily\r\n\r\n"

EVENTS: list[Event] = [
    RequestRetransmitted(),
    AckReceived(),
    ResponseSent(302, R302),
    TimerFired("G"),
    TransportFailed(),
]
MACHINES = [InviteServerTransaction, NonInviteServerTransaction]


def state_of(txn: ServerTransaction) -> State:
    return txn.state


def invite(peer=UDP_PEER) -> InviteServerTransaction:
    return InviteServerTransaction(("z9hG4bK1", "127.0.0.1:5060", "INVITE"), peer, TIMERS, "tag")


def non_invite(peer=UDP_PEER) -> NonInviteServerTransaction:
    return NonInviteServerTransaction(("z9hG4bK2", "127.0.0.1:5060", "OPTIONS"), peer, TIMERS)


# the tables --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("machine", "state", "event"),
    [
        pytest.param(m, s, e, id="%s-%s-%s" % (m.__name__[:9], s.name, type(e).__name__))
        for m, s, e in itertools.product(MACHINES, State, EVENTS)
        if (s, type(e)) not in m.TRANSITIONS
    ],
)
def test_pair_not_in_the_table_is_a_transaction_error(
    machine: type[ServerTransaction], state: State, event: Event
) -> None:
    txn = machine(("k",), UDP_PEER, TIMERS)
    txn.state = state
    with pytest.raises(TransactionError) as info:
        txn.handle(event)
    assert info.value.status == 500
    assert txn.state is state


def test_terminated_accepts_nothing() -> None:
    for machine in MACHINES:
        assert not [k for k in machine.TRANSITIONS if k[0] is State.TERMINATED]


def test_every_state_a_machine_reaches_is_in_its_table() -> None:
    assert {s for s, _ in InviteServerTransaction.TRANSITIONS} == {
        State.PROCEEDING,
        State.COMPLETED,
        State.CONFIRMED,
    }
    assert {s for s, _ in NonInviteServerTransaction.TRANSITIONS} == {
        State.TRYING,
        State.PROCEEDING,
        State.COMPLETED,
    }


# INVITE (§17.2.1) ----------------------------------------------------------------
def test_invite_starts_proceeding_and_resends_the_last_provisional() -> None:
    txn = invite()
    assert state_of(txn) is State.PROCEEDING
    assert txn.handle(RequestRetransmitted()) == []
    assert txn.handle(ResponseSent(100, R100)) == [Send(R100, UDP_PEER)]
    assert state_of(txn) is State.PROCEEDING
    assert txn.handle(RequestRetransmitted()) == [Send(R100, UDP_PEER)]


def test_invite_3xx_over_udp_completes_and_arms_g_and_h() -> None:
    txn = invite()
    actions = txn.handle(ResponseSent(302, R302))
    assert actions == [Send(R302, UDP_PEER), StartTimer("G", T1), StartTimer("H", 64 * T1)]
    assert state_of(txn) is State.COMPLETED


def test_invite_timer_g_doubles_from_t1_and_caps_at_t2() -> None:
    txn = invite()
    txn.handle(ResponseSent(302, R302))
    delays = []
    for _ in range(6):
        actions = txn.handle(TimerFired("G"))
        assert actions[0] == Send(R302, UDP_PEER)
        (start,) = [a for a in actions if isinstance(a, StartTimer)]
        assert start.name == "G"
        delays.append(start.delay)
    assert delays == [2 * T1, 4 * T1, T2, T2, T2, T2]
    assert state_of(txn) is State.COMPLETED


def test_invite_retransmission_in_completed_gets_the_same_response_bytes() -> None:
    txn = invite()
    txn.handle(ResponseSent(302, R302))
    assert txn.handle(RequestRetransmitted()) == [Send(R302, UDP_PEER)]
    assert txn.handle(RequestRetransmitted()) == [Send(R302, UDP_PEER)]


def test_invite_timer_h_terminates_without_ack() -> None:
    txn = invite()
    txn.handle(ResponseSent(404, R302))
    txn.handle(TimerFired("G"))
    assert txn.handle(TimerFired("H")) == [Terminated("no ACK (Timer H)")]
    assert state_of(txn) is State.TERMINATED


def test_invite_ack_over_udp_confirms_and_timer_i_terminates() -> None:
    txn = invite()
    txn.handle(ResponseSent(302, R302))
    assert txn.handle(AckReceived()) == [StopTimer("G"), StopTimer("H"), StartTimer("I", T4)]
    assert state_of(txn) is State.CONFIRMED
    assert txn.handle(AckReceived()) == []
    assert txn.handle(RequestRetransmitted()) == []
    assert txn.handle(TimerFired("I")) == [Terminated("done")]
    assert state_of(txn) is State.TERMINATED


def test_invite_3xx_over_tcp_has_no_timer_g_and_ack_terminates() -> None:
    txn = invite(TCP_PEER)
    assert txn.handle(ResponseSent(302, R302)) == [Send(R302, TCP_PEER), StartTimer("H", 64 * T1)]
    assert state_of(txn) is State.COMPLETED
    assert txn.handle(AckReceived()) == [StopTimer("H"), Terminated("ACK received")]
    assert state_of(txn) is State.TERMINATED


def test_invite_2xx_terminates_at_once() -> None:
    txn = invite()
    assert txn.handle(ResponseSent(200, R200)) == [Send(R200, UDP_PEER), Terminated("2xx sent")]
    assert state_of(txn) is State.TERMINATED


@pytest.mark.parametrize("state_after_302", [False, True])
def test_invite_transport_failure_terminates(state_after_302: bool) -> None:
    txn = invite()
    if state_after_302:
        txn.handle(ResponseSent(302, R302))
    assert txn.handle(TransportFailed()) == [Terminated("transport error")]
    assert state_of(txn) is State.TERMINATED


# non-INVITE (§17.2.2) ------------------------------------------------------------
def test_non_invite_trying_absorbs_retransmissions() -> None:
    txn = non_invite()
    assert state_of(txn) is State.TRYING
    assert txn.handle(RequestRetransmitted()) == []


def test_non_invite_provisional_moves_to_proceeding_and_is_resent() -> None:
    txn = non_invite()
    assert txn.handle(ResponseSent(100, R100)) == [Send(R100, UDP_PEER)]
    assert state_of(txn) is State.PROCEEDING
    assert txn.handle(RequestRetransmitted()) == [Send(R100, UDP_PEER)]


def test_non_invite_final_over_udp_waits_timer_j_resending_the_same_bytes() -> None:
    txn = non_invite()
    txn.handle(ResponseSent(100, R100))
    assert txn.handle(ResponseSent(200, R200)) == [Send(R200, UDP_PEER), StartTimer("J", 64 * T1)]
    assert state_of(txn) is State.COMPLETED
    assert txn.handle(RequestRetransmitted()) == [Send(R200, UDP_PEER)]
    assert txn.handle(TimerFired("J")) == [Terminated("done")]
    assert state_of(txn) is State.TERMINATED


def test_non_invite_final_over_tcp_terminates_at_once() -> None:
    """Timer J is zero over a reliable transport."""
    txn = non_invite(TCP_PEER)
    assert txn.handle(ResponseSent(200, R200)) == [
        Send(R200, TCP_PEER),
        Terminated("final response sent"),
    ]
    assert state_of(txn) is State.TERMINATED


def test_non_invite_transport_failure_terminates() -> None:
    txn = non_invite()
    assert txn.handle(TransportFailed()) == [Terminated("transport error")]


# matching (§17.2.3) -----------------------------------------------------------------
def test_key_of_an_rfc3261_branch_is_branch_sent_by_and_method() -> None:
    key = transaction_key("INVITE", "z9hG4bKabc", "Client.Contoso.com:5060", ("ignored",))
    assert key == ("z9hG4bKabc", "client.contoso.com:5060", "INVITE")


def test_ack_matches_the_invite_and_cancel_does_not() -> None:
    invite_key = transaction_key("INVITE", "z9hG4bKabc", "h:5060", ())
    assert transaction_key("ACK", "z9hG4bKabc", "h:5060", ()) == invite_key
    assert transaction_key("CANCEL", "z9hG4bKabc", "h:5060", ()) != invite_key


def test_branch_without_magic_cookie_falls_back_to_rfc2543_fields() -> None:
    fields = ("sip:a@b", "ftag", "call", "1", "h:5060")
    assert transaction_key("INVITE", "abc", "h:5060", fields) == ("2543", "INVITE", *fields)
    assert transaction_key("OPTIONS", None, "h:5060", fields) == ("2543", "OPTIONS", *fields)
    assert transaction_key("ACK", None, "h:5060", fields) == ("2543", "INVITE", *fields)
