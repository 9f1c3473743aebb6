"""Server transactions, RFC 3261 §17.2.

Theory of operation
-------------------
A server transaction absorbs retransmissions of a request and retransmits
its own final response until the far end stops asking.  Each machine is a
table ``(state, event type) -> handler``; a pair not in the table is a
``TransactionError`` (a bug in the caller, never a network condition).

* INVITE (§17.2.1, figure 7).  PROCEEDING: a retransmitted INVITE gets the
  last provisional again.  A 2xx ends the transaction (the TU retransmits it).
  A 3xx-6xx moves to COMPLETED: over UDP it is resent on Timer G (T1, doubling
  up to T2) until an ACK arrives; Timer H (64*T1) gives up waiting for the ACK.
  The ACK moves to CONFIRMED, which absorbs further ACKs for Timer I (T4 over
  UDP, zero over TCP/TLS).
* non-INVITE (§17.2.2, figure 8).  TRYING/PROCEEDING until the final
  response, then COMPLETED, which answers retransmitted requests with that
  response for Timer J (64*T1 over UDP, zero over TCP/TLS).

The machines hold no clock and no timer objects: they ask for timers with
``StartTimer(name, delay)`` and ``StopTimer(name)``, and the element fires
them back as ``TimerFired(name)``.  Matching a request to its transaction
(§17.2.3) is ``transaction_key``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from proxy.sip.errors import SipError
from proxy.sip.peer import Peer, Send


class TransactionError(SipError):
    """An event the machine has no transition for in its current state."""

    status = 500


class State(enum.Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"

    #: Members are singletons compared by identity: hash them by identity too
    #: (``Enum.__hash__`` is Python code, and every event looks a state up).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 §17.1.1.1 / table 4 timer base values, in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


# events -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestRetransmitted:
    """The same request arrived again (§17.2.3 matched it to us)."""


@dataclass(frozen=True, slots=True)
class AckReceived:
    """An ACK matched this INVITE transaction (non-2xx final, §17.2.1)."""


@dataclass(frozen=True, slots=True)
class ResponseSent:
    """The TU passes a response down to be sent (§17.2.1, §17.2.2)."""

    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str


@dataclass(frozen=True, slots=True)
class TransportFailed:
    """The transport could not deliver a response (§17.2.4)."""


Event = RequestRetransmitted | AckReceived | ResponseSent | TimerFired | TransportFailed


# actions ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartTimer:
    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over; the element forgets it and its timers."""

    reason: str


Action = Send | StartTimer | StopTimer | Terminated

#: Events and actions that carry nothing of one transaction are frozen, so one
#: instance of each serves them all; building them per message was measurable.
REQUEST_RETRANSMITTED = RequestRetransmitted()
ACK_RECEIVED = AckReceived()
_STOP_G = StopTimer("G")
_STOP_H = StopTimer("H")
_TIMERS_FIRED = {name: TimerFired(name) for name in "GHIJ"}
_DONE = Terminated("done")
_NO_ACK = Terminated("no ACK (Timer H)")
_TRANSPORT_ERROR = Terminated("transport error")
_ACKED = Terminated("ACK received")
_2XX_SENT = Terminated("2xx sent")
_FINAL_SENT = Terminated("final response sent")
_start_timers: dict[tuple[str, float], StartTimer] = {}


def timer_fired(name: str) -> TimerFired:
    """``TimerFired(name)``, one instance per server timer (G, H, I, J)."""
    return _TIMERS_FIRED.get(name) or TimerFired(name)


def start_timer(name: str, delay: float) -> StartTimer:
    """``StartTimer(name, delay)``, one instance per pair: the delays are the
    configured T1, T2, T4 and their multiples (§17.2, table 4), a handful."""
    action = _start_timers.get((name, delay))
    if action is None:
        action = StartTimer(name, delay)
        if len(_start_timers) < 256:
            _start_timers[name, delay] = action
    return action


#: A transition: (machine, event) -> actions; the machine is typed loosely
#: because subclasses add their own handlers to the table.
Handler = Callable[[Any, Event], list[Action]]


class ServerTransaction:
    """Common state of both server machines."""

    __slots__ = ("key", "peer", "timers", "state", "last_response", "to_tag", "_g_interval")

    TRANSITIONS: dict[tuple[State, type], Handler] = {}
    INITIAL = State.TRYING

    def __init__(
        self, key: tuple[str, ...], peer: Peer, timers: Timers, to_tag: str | None = None
    ) -> None:
        self.key = key
        self.peer = peer
        self.timers = timers
        self.state = self.INITIAL
        self.last_response: bytes | None = None
        self.to_tag = to_tag
        self._g_interval = timers.t1

    def handle(self, event: Event) -> list[Action]:
        handler = self.TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise TransactionError(
                "%s: no transition for %s in %s"
                % (type(self).__name__, type(event).__name__, self.state.name)
            )
        return handler(self, event)

    # shared handlers
    def _resend(self, event: Event) -> list[Action]:
        return [Send(self.last_response, self.peer)] if self.last_response else []

    def _absorb(self, event: Event) -> list[Action]:
        return []

    def _terminate(self, event: Event) -> list[Action]:
        self.state = State.TERMINATED
        if isinstance(event, TransportFailed):
            return [_TRANSPORT_ERROR]
        if isinstance(event, TimerFired) and event.name == "H":
            return [_NO_ACK]
        return [_DONE]


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.1."""

    __slots__ = ()
    INITIAL = State.PROCEEDING

    def _respond(self, event: Event) -> list[Action]:
        assert isinstance(event, ResponseSent)
        self.last_response = event.data
        send = Send(event.data, self.peer)
        if event.status < 200:
            return [send]
        if event.status < 300:
            self.state = State.TERMINATED
            return [send, _2XX_SENT]
        self.state = State.COMPLETED
        t = self.timers
        if self.peer.reliable:
            return [send, start_timer("H", 64 * t.t1)]
        self._g_interval = t.t1
        return [send, start_timer("G", t.t1), start_timer("H", 64 * t.t1)]

    def _timer_g(self, event: Event) -> list[Action]:
        assert isinstance(event, TimerFired)
        if event.name != "G":
            return self._terminate(event)
        self._g_interval = min(2 * self._g_interval, self.timers.t2)
        return [Send(self.last_response or b"", self.peer), start_timer("G", self._g_interval)]

    def _ack(self, event: Event) -> list[Action]:
        self.state = State.CONFIRMED
        # CONFIRMED only absorbs (§17.2.1): the response is not sent again, and
        # every call keeps its transaction for T4 after the ACK
        self.last_response = None
        if self.peer.reliable:
            self.state = State.TERMINATED
            return [_STOP_H, _ACKED]
        return [_STOP_G, _STOP_H, start_timer("I", self.timers.t4)]

    TRANSITIONS: dict[tuple[State, type], Handler] = {
        (State.PROCEEDING, RequestRetransmitted): ServerTransaction._resend,
        (State.PROCEEDING, ResponseSent): _respond,
        (State.PROCEEDING, TransportFailed): ServerTransaction._terminate,
        (State.COMPLETED, RequestRetransmitted): ServerTransaction._resend,
        (State.COMPLETED, AckReceived): _ack,
        (State.COMPLETED, TimerFired): _timer_g,
        (State.COMPLETED, TransportFailed): ServerTransaction._terminate,
        (State.CONFIRMED, RequestRetransmitted): ServerTransaction._absorb,
        (State.CONFIRMED, AckReceived): ServerTransaction._absorb,
        (State.CONFIRMED, TimerFired): ServerTransaction._terminate,
    }


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.2."""

    __slots__ = ()
    INITIAL = State.TRYING

    def _respond(self, event: Event) -> list[Action]:
        assert isinstance(event, ResponseSent)
        self.last_response = event.data
        send = Send(event.data, self.peer)
        if event.status < 200:
            self.state = State.PROCEEDING
            return [send]
        if self.peer.reliable:
            self.state = State.TERMINATED
            return [send, _FINAL_SENT]
        self.state = State.COMPLETED
        return [send, start_timer("J", 64 * self.timers.t1)]

    TRANSITIONS: dict[tuple[State, type], Handler] = {
        (State.TRYING, RequestRetransmitted): ServerTransaction._absorb,
        (State.TRYING, ResponseSent): _respond,
        (State.TRYING, TransportFailed): ServerTransaction._terminate,
        (State.PROCEEDING, RequestRetransmitted): ServerTransaction._resend,
        (State.PROCEEDING, ResponseSent): _respond,
        (State.PROCEEDING, TransportFailed): ServerTransaction._terminate,
        (State.COMPLETED, RequestRetransmitted): ServerTransaction._resend,
        (State.COMPLETED, TimerFired): ServerTransaction._terminate,
        (State.COMPLETED, TransportFailed): ServerTransaction._terminate,
    }


def transaction_key(
    method: str, branch: str | None, sent_by: str, fallback: tuple[str, ...]
) -> tuple[str, ...]:
    """The server transaction a request belongs to (RFC 3261 §17.2.3).

    With an RFC 3261 branch (magic cookie) the key is branch, sent-by and
    method, ACK matching INVITE; otherwise the RFC 2543 fields given as
    ``fallback`` (Request-URI, From tag, Call-ID, CSeq number, top Via),
    which a caller holding an RFC 3261 branch may leave empty.
    """
    if method == "ACK":
        method = "INVITE"
    if is_rfc3261_branch(branch):
        return (branch, sent_by.lower(), method)
    return ("2543", method, *fallback)


def is_rfc3261_branch(branch: str | None) -> TypeGuard[str]:
    """A branch with the magic cookie is unique across space and time
    (RFC 3261 §8.1.1.7), so it alone identifies the transaction."""
    return branch is not None and branch.startswith("z9hG4bK")
