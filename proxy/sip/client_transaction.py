"""Client transactions, RFC 3261 §17.1.

Theory of operation
-------------------
A client transaction sends one request towards one target, retransmits it
over UDP until the far end answers, passes the responses up to the TU
(``Deliver``) and tells the TU when nobody answered (``TimedOut``) or the
transport could not carry the request (``Unreachable``, §17.1.4), so that the
TU can try the next target of its DNS plan (RFC 3263 §4.3).  Each machine is
a table ``(state, event type) -> handler``; a pair not in the table is a
``TransactionError`` (a bug in the caller, never a network condition).

* INVITE (§17.1.1, figure 5).  CALLING sends the INVITE, resends it on Timer A
  (T1, doubling, UDP only) and gives up on Timer B (64*T1).  A provisional
  moves to PROCEEDING, where nothing is resent.  A 2xx ends the transaction
  (the TU acknowledges it, §13.2.2.4).  A 3xx-6xx is acknowledged by the
  transaction itself with an ACK built from the original request (§17.1.1.3)
  and moves to COMPLETED, which answers every retransmission of that final
  response with the same ACK for Timer D (32 s over UDP; zero over TCP/TLS, so
  a reliable transport terminates at once).
* non-INVITE (§17.1.2, figure 6).  TRYING sends the request and resends it on
  Timer E (T1, doubling up to T2, UDP only); PROCEEDING resends on Timer E
  every T2.  Timer F (64*T1) gives up.  A final response moves to COMPLETED,
  which absorbs retransmissions of it for Timer K (T4 over UDP, zero over
  TCP/TLS).

The machines hold no clock and no timer objects: they ask for timers with
``StartTimer(name, delay)`` and ``StopTimer(name)``, and the element fires
them back as ``TimerFired(name)``.  ``start()`` sends the request; after that
everything goes through ``handle(event)``.  Matching a response to its client
transaction (§17.1.3) is ``client_key`` / ``response_key``.

This is RFC 3261 as written: a 2xx to an INVITE terminates the transaction
(RFC 6026's Accepted state is not modelled; a proxy forwards later 2xx
retransmissions statelessly, §16.7 step 5).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.sip.errors import SipError
from proxy.sip.message import Request, Response, hop_request, parse, parse_read
from proxy.sip.peer import Peer, Send
from proxy.sip.transaction import (
    StartTimer,
    StopTimer,
    Terminated,
    TimerFired,
    Timers,
    TransactionError,
    TransportFailed,
)

__all__ = [
    "Action",
    "ClientState",
    "ClientTransaction",
    "Deliver",
    "Event",
    "InviteClientTransaction",
    "NonInviteClientTransaction",
    "ResponseReceived",
    "TimedOut",
    "Unreachable",
    "build_ack",
    "client_key",
    "response_key",
]

#: Timer D over an unreliable transport: "at least 32 seconds" (§17.1.1.2).
TIMER_D_UDP = 32.0


class ClientState(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"

    #: Members are singletons compared by identity: hash them by identity too
    #: (``Enum.__hash__`` is Python code, and every event looks a state up).
    __hash__ = object.__hash__


# events -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response matched this transaction (§17.1.3); ``data`` is its wire form."""

    status: int
    data: bytes


Event = ResponseReceived | TimerFired | TransportFailed


# actions ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Deliver:
    """Pass a response up to the TU (§17.1.1.2, §17.1.2.2)."""

    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Timer B or F fired with no final response: the TU treats it as a 408
    (§8.1.3.1, §16.7 step 2) and may try the next target (RFC 3263 §4.3)."""

    timer: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The transport could not send the request or ACK (§17.1.4): the TU
    treats it as a 503 (§8.1.3.1) and may try the next target."""

    reason: str


Action = Send | StartTimer | StopTimer | Deliver | TimedOut | Unreachable | Terminated
#: A transition: (machine, event) -> actions.
Handler = Callable[[Any, Any], list[Action]]


class ClientTransaction:
    """Common state of both client machines."""

    __slots__ = ("_request", "data", "branch", "peer", "timers", "state", "started", "_interval")

    TRANSITIONS: dict[tuple[ClientState, type], Handler] = {}
    INITIAL = ClientState.TRYING
    RETRANSMIT = "E"
    TIMEOUT = "F"
    WAIT = "K"

    def __init__(
        self, request: Request | bytes, peer: Peer, timers: Timers, branch: str = ""
    ) -> None:
        """``request`` parsed, or as its bytes (the fast path's: parsed only
        if something asks for ``request``); ``branch``, the branch of its
        top Via, read from the request when the caller does not give it."""
        if isinstance(request, Request):
            self._request: Request | None = request
            self.data = bytes(request)
        else:
            self._request = None
            self.data = request
        self.peer = peer
        if not branch:
            via = self.request.via or self.request.top_via()
            branch = via.branch or ""
        self.branch = branch
        self.timers = timers
        self.state = self.INITIAL
        self.started = False
        self._interval = timers.t1

    @property
    def request(self) -> Request:
        """The request this transaction sends."""
        request = self._request
        if request is None:
            request = self._request = parse_read(self.data, stream=self.peer.reliable)
        return request

    @property
    def key(self) -> tuple[str, str]:
        """The §17.1.3 key: top Via branch and CSeq method of the request."""
        return client_key(self.branch, self.request.method)

    def start(self) -> list[Action]:
        """Pass the request to the transport and arm the timers (§17.1.1.2, §17.1.2.2)."""
        if self.started:
            raise TransactionError("%s: started twice" % type(self).__name__)
        self.started = True
        actions: list[Action] = [Send(self.data, self.peer)]
        if not self.peer.reliable:
            actions.append(StartTimer(self.RETRANSMIT, self.timers.t1))
        actions.append(StartTimer(self.TIMEOUT, 64 * self.timers.t1))
        return actions

    def handle(self, event: Event) -> list[Action]:
        handler = self.TRANSITIONS.get((self.state, type(event)))
        if handler is None or not self.started:
            raise TransactionError(
                "%s: no transition for %s in %s"
                % (type(self).__name__, type(event).__name__, self.state.name)
            )
        return handler(self, event)

    # shared handlers
    def _timeout(self, event: TimerFired) -> list[Action]:
        if event.name != self.TIMEOUT:
            raise TransactionError(
                "%s: timer %s in %s" % (type(self).__name__, event.name, self.state.name)
            )
        self.state = ClientState.TERMINATED
        return [
            StopTimer(self.RETRANSMIT),
            TimedOut(event.name),
            Terminated("no final response (Timer %s)" % event.name),
        ]

    def _transport_failed(self, event: TransportFailed) -> list[Action]:
        self.state = ClientState.TERMINATED
        return [
            StopTimer(self.RETRANSMIT),
            StopTimer(self.TIMEOUT),
            Unreachable("transport error"),
            Terminated("transport error"),
        ]

    def _completed_timer(self, event: TimerFired) -> list[Action]:
        if event.name != self.WAIT:
            raise TransactionError(
                "%s: timer %s in %s" % (type(self).__name__, event.name, self.state.name)
            )
        self.state = ClientState.TERMINATED
        return [Terminated("done")]

    def _absorb(self, event: Event) -> list[Action]:
        return []


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.1 (figure 5)."""

    __slots__ = ("ack",)
    INITIAL = ClientState.CALLING
    RETRANSMIT = "A"
    TIMEOUT = "B"
    WAIT = "D"

    def __init__(
        self, request: Request | bytes, peer: Peer, timers: Timers, branch: str = ""
    ) -> None:
        method = request.method if isinstance(request, Request) else _method_of(request)
        if method != "INVITE":
            raise TransactionError("InviteClientTransaction for %s" % method)
        super().__init__(request, peer, timers, branch)
        self.ack: bytes | None = None

    def _calling_timer(self, event: TimerFired) -> list[Action]:
        if event.name != "A":
            return self._timeout(event)
        self._interval *= 2
        return [Send(self.data, self.peer), StartTimer("A", self._interval)]

    def _response(self, event: ResponseReceived) -> list[Action]:
        deliver = Deliver(event.status, event.data)
        if event.status < 200:
            if self.state is ClientState.PROCEEDING:
                return [deliver]
            self.state = ClientState.PROCEEDING
            return [StopTimer("A"), StopTimer("B"), deliver]
        stop: list[Action] = [StopTimer("A"), StopTimer("B")]
        if self.state is ClientState.PROCEEDING:
            stop = []
        if event.status < 300:
            self.state = ClientState.TERMINATED
            return [*stop, deliver, Terminated("2xx received")]
        self.ack = build_ack(self.request, event.data)
        send = Send(self.ack, self.peer)
        if self.peer.reliable:
            self.state = ClientState.TERMINATED
            return [*stop, send, deliver, Terminated("final response acknowledged")]
        self.state = ClientState.COMPLETED
        return [*stop, send, deliver, StartTimer("D", TIMER_D_UDP)]

    def _reack(self, event: ResponseReceived) -> list[Action]:
        """§17.1.1.2: a retransmitted final response gets the ACK again, and
        is not passed up."""
        if event.status >= 300 and self.ack is not None:
            return [Send(self.ack, self.peer)]
        return []

    TRANSITIONS: dict[tuple[ClientState, type], Handler] = {
        (ClientState.CALLING, ResponseReceived): _response,
        (ClientState.CALLING, TimerFired): _calling_timer,
        (ClientState.CALLING, TransportFailed): ClientTransaction._transport_failed,
        (ClientState.PROCEEDING, ResponseReceived): _response,
        (ClientState.PROCEEDING, TransportFailed): ClientTransaction._transport_failed,
        (ClientState.COMPLETED, ResponseReceived): _reack,
        (ClientState.COMPLETED, TimerFired): ClientTransaction._completed_timer,
        (ClientState.COMPLETED, TransportFailed): ClientTransaction._transport_failed,
    }


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.2 (figure 6)."""

    __slots__ = ()
    INITIAL = ClientState.TRYING
    RETRANSMIT = "E"
    TIMEOUT = "F"
    WAIT = "K"

    def __init__(
        self, request: Request | bytes, peer: Peer, timers: Timers, branch: str = ""
    ) -> None:
        method = request.method if isinstance(request, Request) else _method_of(request)
        if method in ("INVITE", "ACK"):
            raise TransactionError("NonInviteClientTransaction for %s" % method)
        super().__init__(request, peer, timers, branch)

    def _timer(self, event: TimerFired) -> list[Action]:
        if event.name != "E":
            return self._timeout(event)
        if self.state is ClientState.PROCEEDING:
            self._interval = self.timers.t2
        else:
            self._interval = min(2 * self._interval, self.timers.t2)
        return [Send(self.data, self.peer), StartTimer("E", self._interval)]

    def _response(self, event: ResponseReceived) -> list[Action]:
        deliver = Deliver(event.status, event.data)
        if event.status < 200:
            self.state = ClientState.PROCEEDING
            return [deliver]
        stop: list[Action] = [StopTimer("E"), StopTimer("F")]
        if self.peer.reliable:
            self.state = ClientState.TERMINATED
            return [*stop, deliver, Terminated("final response received")]
        self.state = ClientState.COMPLETED
        return [*stop, deliver, StartTimer("K", self.timers.t4)]

    TRANSITIONS: dict[tuple[ClientState, type], Handler] = {
        (ClientState.TRYING, ResponseReceived): _response,
        (ClientState.TRYING, TimerFired): _timer,
        (ClientState.TRYING, TransportFailed): ClientTransaction._transport_failed,
        (ClientState.PROCEEDING, ResponseReceived): _response,
        (ClientState.PROCEEDING, TimerFired): _timer,
        (ClientState.PROCEEDING, TransportFailed): ClientTransaction._transport_failed,
        (ClientState.COMPLETED, ResponseReceived): ClientTransaction._absorb,
        (ClientState.COMPLETED, TimerFired): ClientTransaction._completed_timer,
    }


def build_ack(request: Request, response: bytes) -> bytes:
    """The ACK for a 3xx-6xx final response to ``request`` (RFC 3261 §17.1.1.3).

    Request-URI, Call-ID and From equal the original request's; To is the
    response's (with the tag the UAS added); a single Via, the request's top
    one (same branch, so the server transaction matches it, §17.2.3); CSeq
    number of the request with method ACK; the request's Route headers, so a
    stateless proxy on the way routes the ACK as it routed the INVITE.
    """
    try:
        msg = parse(response)
    except SipError as exc:
        raise TransactionError("cannot acknowledge: %s" % exc.reason) from None
    if not isinstance(msg, Response) or request.cseq is None:
        raise TransactionError("cannot acknowledge: not a response to a parsed request")
    return hop_request("ACK", request, msg.raw_lines("to"))


def _method_of(data: bytes) -> str:
    """The method of a request's bytes (its first word; "" for none)."""
    space = data.find(b" ", 0, 32)
    return data[:space].decode("latin-1") if space > 0 else ""


def client_key(branch: str, method: str) -> tuple[str, str]:
    """The key of a client transaction (RFC 3261 §17.1.3): the branch of the
    top Via of its request, and its method.  An ACK for a non-2xx belongs to
    the INVITE transaction that sent it."""
    return (branch, "INVITE" if method == "ACK" else method)


def response_key(response: Response) -> tuple[str, str] | None:
    """The client transaction a response belongs to (RFC 3261 §17.1.3): branch
    of its top Via and method of its CSeq; ``None`` when the top Via has no
    branch, which no transaction of ours sent."""
    via = response.via
    if via is None:
        try:
            via = response.top_via()
        except SipError:
            return None
    if via.branch is None or response.cseq is None:
        return None
    return client_key(via.branch, response.cseq.method)
