"""The SIP element: bytes and ``now`` in, bytes to send and a deadline out.

Theory of operation
-------------------
``Element.receive(data, peer, now)`` parses one message, matches it to a
server transaction (RFC 3261 §17.2.3) or creates one, lets the UAS core decide
the answer (§8.2 checks, then ``routing.decide``) and returns the ``Send``
actions.  ``next_deadline()`` says when ``handle_timers(now)`` must run next.
There is no socket, no asyncio and no clock here; the shell in
``proxy.server`` moves bytes and arms one timer.

Responses are sent per §18.2.2 and RFC 3581: on the connection the request
came in on for TCP/TLS; over UDP to the source address, and to the source
port when the top Via has ``rport`` (else the sent-by port).  The top Via of
the response gets ``received`` (§18.2.1) and the ``rport`` value.

An endpoint in redirect mode is answered with a 302 (§8.3); one in proxy mode
is forwarded statefully (§16): a ``Resolve`` action asks the shell for the
RFC 3263 plan, ``targets_ready``/``resolve_failed`` bring it back, and one
client transaction per target (§17.1) carries the request down the plan.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

from proxy import routing
from proxy.resolve import Target, is_address
from proxy.sip.client_transaction import (
    TIMER_D_UDP,
    ClientState,
    ClientTransaction,
    Deliver,
    InviteClientTransaction,
    NonInviteClientTransaction,
    ResponseReceived,
    TimedOut,
    Unreachable,
    client_key,
    response_key,
)
from proxy.sip.errors import SipError, UriError
from proxy.sip.headers import (
    MAGIC_COOKIE,
    NameAddr,
    Via,
    option_tags,
    param_value,
    split_commas,
)
from proxy.sip.message import (
    Header,
    Request,
    Response,
    line_value,
    make_response,
    parse,
    parse_read,
)
from proxy.sip.peer import Peer, Send
from proxy.sip.proxy_core import (
    ProxyRejection,
    branch_for,
    branch_with,
    cancel_of,
    choose_best,
    forward,
    loop_hash,
    preprocess_routes,
    stateless_unique,
    strip_own_via,
    validate_request,
    with_routes,
)
from proxy.sip.redirect import build_final, scan
from proxy.sip.relay import (
    IN_DIALOG_STARTS,
    ScannedInvite,
    ScannedResponse,
    forward_in_dialog,
    forward_invite,
    scan_in_dialog,
    scan_invite,
    scan_response,
    strip_top_via,
)
from proxy.sip.route_token import TOWARD_CLIENT, RouteTokens
from proxy.sip.transaction import (
    ACK_RECEIVED,
    REQUEST_RETRANSMITTED,
    Action,
    InviteServerTransaction,
    NonInviteServerTransaction,
    ResponseSent,
    ServerTransaction,
    StartTimer,
    State,
    StopTimer,
    Terminated,
    TimerFired,
    Timers,
    TransactionError,
    TransportFailed,
    is_rfc3261_branch,
    timer_fired,
    transaction_key,
)
from proxy.sip.uri import SipUri, aor_key_of, parse_uri
from proxy.store import Endpoint, Snapshot

ALLOW = "INVITE, ACK, CANCEL, OPTIONS, SUBSCRIBE, NOTIFY, INFO, UPDATE, BYE, MESSAGE"
ACCEPT = "application/sdp"
SUPPORTED: frozenset[str] = frozenset()

#: ms-diagnostics codes of pcproxy's own answers (see README).
DIAG_NOT_FOUND = 52001
DIAG_NOT_REGISTRAR = 52002
DIAG_NO_DIALOG = 52003
DIAG_BAD_REQUEST = 52004
DIAG_POOL_UNREACHABLE = 52005
DIAG_FORGED_ROUTE = 52006
DIAG_UNTRUSTED = 52007
DIAG_RATE_LIMITED = 52008

#: Requests that may create a dialog: pcproxy Record-Routes them (§16.6 step 4)
#: so the dialog's INFO, UPDATE and BYE come back through it.
#: The timers of a client transaction (§17.1), and pcproxy's own give-up
#: for a CANCELled INVITE branch that never ends (§9.1).
GIVE_UP = "Z"
#: The timers a client transaction can arm, by kind (§17.1.1.2, §17.1.2.2),
#: with the INVITE's give-up after its CANCEL: what ending one cancels.
INVITE_CLIENT_TIMERS = "ABD" + GIVE_UP
NON_INVITE_CLIENT_TIMERS = "EFK"
#: The timers of a context: T (target_timeout) for every request; C (§16.8),
#: L (the 2xx retransmission window) and X (§9.1) for an INVITE only.
INVITE_CONTEXT_TIMERS = "TCLX"
DIALOG_CREATING = frozenset(("INVITE", "SUBSCRIBE", "REFER", "NOTIFY"))


@dataclass(frozen=True, slots=True)
class ElementConfig:
    default_mode: str = "redirect"
    server_name: str = "pcproxy.invalid"
    timers: Timers = Timers()
    max_message_size: int = 65535
    max_headers: int = 128
    record_route: bool = True
    #: Seconds one pool target may stay silent before the next is tried.
    target_timeout: float = 2.0
    #: §16.8: more than three minutes.
    timer_c: float = 181.0
    #: Key of the loop-detection hash (§16.6 step 8) and the Record-Route
    #: tokens; workers of one service share it.
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    retry_after: int = 5
    #: Answer everyday INVITEs and SUBSCRIBEs for redirect endpoints through
    #: ``proxy.sip.redirect`` (same bytes, a fraction of the work).
    fast_redirect: bool = True
    #: Pass everyday responses of proxied requests, and ACKs for 2xx, on
    #: through ``proxy.sip.relay`` (same bytes, without the general parser).
    fast_relay: bool = True


class OwnRoutes(NamedTuple):
    """What the Route lines of a request come to once those naming this
    proxy are removed (§16.4; ``Element._pop_own_routes``)."""

    #: The Route lines left, numbered as they came (``preprocess_routes``).
    routes: tuple[tuple[int, str], ...]
    #: The Request-URI (a strict router's previous hop restored).
    uri: str
    #: Each removed Route's token as (side, flow); None if one is not valid.
    sides: tuple[tuple[str, Peer | None], ...] | None
    #: Whether anything was removed.
    changed: bool


#: What the element's memos hold at most (the Contacts of Request-URIs, the
#: outcome of Route sets, where ACKs go), and how long a key may be (a
#: longer one is worked out every time): what a peer sends cannot grow them.
MEMO_MAX = 1024
MEMO_LONGEST = 2048

K = TypeVar("K")
V = TypeVar("V")


def _remember(memo: dict[K, V], key: K, value: V, length: int) -> None:
    """Keep ``value`` under ``key`` (whose text is ``length`` long) in one of
    the element's memos: not at all past ``MEMO_LONGEST``, and the memo
    emptied first when it holds ``MEMO_MAX`` entries."""
    if length > MEMO_LONGEST:
        return
    if len(memo) >= MEMO_MAX:
        memo.clear()
    memo[key] = value


class Listener(NamedTuple):
    """One bound socket as the element sees it: what goes in Via and
    Record-Route (``index`` is the transport layer's listener number).

    ``pool_side``: a socket of this worker alone (``--workers``), preferred
    for what is sent toward a pool, so the pool's responses and in-dialog
    requests come back to the worker that holds the transaction."""

    transport: str
    host: str
    port: int
    number: int
    pool_side: bool = False

    @property
    def hostport(self) -> str:
        return (
            "[%s]:%d" % (self.host, self.port)
            if ":" in self.host
            else "%s:%d"
            % (
                self.host,
                self.port,
            )
        )


@dataclass(frozen=True, slots=True)
class Resolve:
    """Action: find the targets of ``host`` (RFC 3263) and hand them to
    ``Element.targets_ready(ref, ...)`` or ``Element.resolve_failed(ref, ...)``."""

    ref: int
    host: str
    port: int | None
    transport: str | None


@dataclass(frozen=True, slots=True)
class MarkFailed:
    """Action: ``target`` did not serve; later plans try it last (RFC 3263 §4.3)."""

    target: Target


@dataclass(frozen=True, slots=True)
class Note:
    """Action: something an operator should hear about happened to one
    transaction (a failover, a pool nobody answered for, a forged Route, a
    failed DNS plan).  The shell logs it; ``fields`` always carry the
    request's Call-ID, top Via branch and method, never a credential."""

    event: str
    fields: tuple[tuple[str, str], ...]


Output = Send | Resolve | MarkFailed | Note

#: Stands for the request of a context whose INVITE was answered: for 64*T1
#: the context only absorbs retransmissions, and keeps no message alive.
_ANSWERED = Request(method="INVITE")
_ANSWERED_VIA = Via("UDP", "answered.invalid", None, [])


class Way(NamedTuple):
    """Where a request inside a dialog goes (``Element._way``): its Route
    lines all name this proxy, its next hop needs no DNS."""

    #: The new Via up to its branch's unique part, and what follows that part.
    prefix: bytes
    suffix: bytes
    #: The peer it is sent to, the target that stands for, the client's flow
    #: (a request from the pool) and the name a TLS target must prove.
    peer: Peer
    target: Target
    flow: Peer | None
    tls_name: str


class Context:
    """A response context (RFC 3261 §16): one request being proxied.

    pcproxy never forks: a context has one client transaction at a time and
    moves down its target list (RFC 3263 §4.3) when a target refuses, stays
    silent for ``target_timeout`` or answers 503.

    A context the fast path opened (``of_bytes``) holds the request's bytes
    only: ``received``, ``request`` and ``via`` parse them the first time
    something asks (an answer of pcproxy's own, a note), which an everyday
    request never does.
    """

    __slots__ = (
        "ref",
        "server",
        "dest",
        "_request",
        "_received",
        "_via",
        "data",
        "scanned",
        "peer",
        "method",
        "tls_name",
        "record_route",
        "in_dialog",
        "flow",
        "targets",
        "index",
        "client",
        "client_key",
        "target",
        "finals",
        "reasons",
        "provisional",
        "cancelled",
        "cancel_sent",
        "answered",
        "finished",
    )

    def __init__(
        self,
        ref: int,
        server: ServerTransaction | None,
        dest: Peer,
        request: Request | None,
        received: Request | None,
        via: Via | None,
        peer: Peer,
        method: str = "",
        data: bytes = b"",
    ) -> None:
        self.ref = ref
        self.server = server
        self.dest = dest
        self._request = request
        self._received = received
        self._via = via
        #: The request's bytes, for a context ``of_bytes`` (else empty).
        self.data = data
        #: The fast path's scan of an INVITE or SUBSCRIBE (``_fast_proxy``).
        self.scanned: ScannedInvite | None = None
        self.peer = peer
        self.method = received.method if received is not None else method
        self.tls_name = ""
        self.record_route = False
        self.in_dialog = False
        self.flow: Peer | None = None
        self.targets: list[Target] | None = None
        self.index = 0
        self.client: ClientTransaction | None = None
        self.client_key: tuple[str, str] = ("", "")
        self.target: Target | None = None
        self.finals: list[tuple[int, bytes]] = []
        self.reasons: list[str] = []
        self.provisional = False
        self.cancelled = False
        self.cancel_sent = False
        self.answered = False
        self.finished = False

    @classmethod
    def of_bytes(
        cls, ref: int, server: ServerTransaction, dest: Peer, data: bytes, peer: Peer, method: str
    ) -> Context:
        """A context for a request a fast path read (``Element._fast_proxy``,
        ``Element._fast_in_dialog``): ``request`` is the received one without
        its Route lines (none, or all of them pcproxy's)."""
        return cls(ref, server, dest, None, None, None, peer, method, data)

    def forget(self) -> None:
        """Keep nothing of the request: the INVITE was answered (a 2xx), and
        for 64*T1 the context only absorbs retransmissions."""
        self._request = self._received = _ANSWERED
        if self._via is None:
            self._via = _ANSWERED_VIA
        self.data = b""
        self.scanned = None

    @property
    def received(self) -> Request:
        """The request as received."""
        received = self._received
        if received is None:
            received = self._received = parse_read(self.data, stream=self.peer.reliable)
        return received

    @property
    def request(self) -> Request:
        """The request to forward: the received one after §16.4."""
        request = self._request
        if request is None:
            received = self.received
            request = self._request = with_routes(received, (), received.uri)
        return request

    @property
    def via(self) -> Via:
        """The received request's top Via."""
        via = self._via
        if via is None:
            received = self.received
            via = self._via = received.via or received.top_via()
        return via


#: What a keep-alive datagram is made of (RFC 5626 §3.5.1).
_BLANK = b"\r\n\t "

_STATUS_302 = b"SIP/2.0 302 Moved Temporarily\r\n"
_STATUS_100 = b"SIP/2.0 100 Trying\r\n"
#: How the requests ``proxy.sip.redirect`` reads begin (INVITE, SUBSCRIBE).
_FAST_METHODS = frozenset((b"INVI", b"SUBS"))
#: The first Via of a datagram: sent-by and an RFC 3261 branch (§8.1.1.7).
_ACK_VIA = re.compile(
    rb"\r\n(?:Via|v)[ \t]*:[ \t]*SIP/2\.0/[A-Za-z]+[ \t]+([^;, \t\r\n]+)"
    rb"(?:;(?!branch=)[^;,\r\n]*)*;branch=(z9hG4bK[^;, \t\r\n]+)[^,\r\n]*\r\n",
    re.I,
)


class TimerQueue:
    """Pending timers, one FIFO per delay value.

    Every timer of a given delay is due in the order it was armed, so a FIFO
    per delay (there are a handful: T1·2^n up to T2, 64·T1, T4) keeps arming,
    cancelling and expiring O(1).  Entries are keyed by (transaction, timer).

    ``fixed`` names the timers that are nearly always armed with one delay
    (H is always 64·T1, I is T4, G starts at T1): each gets a FIFO of its own
    keyed by owner alone, the cheapest there is, used whenever it is armed
    with that delay; any other delay (G doubling) takes the shared FIFOs.
    Every redirected call arms and clears three such timers, so this is on
    the hot path.

    ``next_deadline()`` looks at every FIFO; ``earliest_armed()`` only says
    how early the timers armed since the last of those calls are due, which
    is all a shell whose own timer already covers the older ones needs.
    """

    __slots__ = ("_queues", "_armed", "_earliest_new", "_fixed")

    def __init__(self, fixed: dict[str, float] | None = None) -> None:
        self._queues: dict[float, OrderedDict[tuple[object, str], float]] = {}
        self._armed: dict[tuple[object, str], float] = {}
        self._earliest_new: float | None = None
        self._fixed: dict[str, tuple[float, OrderedDict[object, float]]] = {
            name: (delay, OrderedDict()) for name, delay in (fixed or {}).items()
        }

    def __len__(self) -> int:
        return len(self._armed) + sum(len(queue) for _, queue in self._fixed.values())

    def arm(self, owner: object, name: str, delay: float, now: float) -> None:
        at = now + delay
        fixed = self._fixed.get(name)
        if fixed is not None:
            queue = fixed[1]
            if queue.pop(owner, None) is None:
                self._cancel_shared(owner, name)
            if fixed[0] == delay:
                queue[owner] = at
                earliest = self._earliest_new
                if earliest is None or at < earliest:
                    self._earliest_new = at
                return
        else:
            self._cancel_shared(owner, name)
        entry = (owner, name)
        shared = self._queues.get(delay)
        if shared is None:
            shared = self._queues[delay] = OrderedDict()
        shared[entry] = at
        self._armed[entry] = delay
        earliest = self._earliest_new
        if earliest is None or at < earliest:
            self._earliest_new = at

    def earliest_armed(self) -> float | None:
        """The earliest deadline armed since the last call or the last
        ``next_deadline()`` (None if none was), then forget it."""
        at, self._earliest_new = self._earliest_new, None
        return at

    def cancel(self, owner: object, name: str) -> None:
        fixed = self._fixed.get(name)
        if fixed is None or fixed[1].pop(owner, None) is None:
            self._cancel_shared(owner, name)

    def _cancel_shared(self, owner: object, name: str) -> None:
        if self._armed:
            entry = (owner, name)
            delay = self._armed.pop(entry, None)
            if delay is not None:
                del self._queues[delay][entry]

    def next_deadline(self) -> float | None:
        self._earliest_new = None
        fronts = [next(iter(queue.values())) for queue in self._all_queues() if queue]
        return min(fronts) if fronts else None

    def pop_due(self, now: float) -> list[tuple[object, str]]:
        due: list[tuple[float, tuple[object, str]]] = []
        for queue in self._queues.values():
            for at, entry in _drain(queue, now):
                del self._armed[entry]
                due.append((at, entry))
        for name, (_, fixed) in self._fixed.items():
            due += [(at, (owner, name)) for at, owner in _drain(fixed, now)]
        due.sort(key=itemgetter(0))
        return [entry for _, entry in due]

    def _all_queues(self) -> list[OrderedDict[Any, float]]:
        return [*self._queues.values(), *(queue for _, queue in self._fixed.values())]


def _drain(queue: OrderedDict[Any, float], now: float) -> list[tuple[float, Any]]:
    """Remove and return, in order, the entries of a FIFO due by ``now``."""
    out: list[tuple[float, Any]] = []
    while queue:
        key, at = next(iter(queue.items()))
        if at > now:
            break
        del queue[key]
        out.append((at, key))
    return out


def fixed_delays(config: ElementConfig) -> dict[str, float]:
    """The delay each timer name is nearly always armed with (RFC 3261
    §17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2, table 4; §16.8 Timer C; the
    context timers of this module), for ``TimerQueue``'s own FIFOs."""
    t = config.timers
    return {
        "A": t.t1,
        "B": 64 * t.t1,
        "D": TIMER_D_UDP,
        "E": t.t1,
        "F": 64 * t.t1,
        "K": t.t4,
        "G": t.t1,
        "H": 64 * t.t1,
        "I": t.t4,
        "J": 64 * t.t1,
        GIVE_UP: 64 * t.t1,
        "T": config.target_timeout,
        "C": config.timer_c,
        "L": 64 * t.t1,
        "X": 64 * t.t1,
    }


class Element:
    """A redirect server (RFC 3261 §8.2, §8.3) and a stateful proxy (§16)
    over server and client transactions (§17)."""

    def __init__(self, snapshot: Snapshot, config: ElementConfig | None = None) -> None:
        self.snapshot = snapshot
        self.config = config or ElementConfig()
        self.transactions: dict[tuple[str, ...], ServerTransaction] = {}
        self.clients: dict[tuple[str, str], tuple[ClientTransaction, Context | None]] = {}
        self.contexts: dict[int, Context] = {}
        self.timers = TimerQueue(fixed_delays(self.config))
        self.counters: Counter[str] = Counter()
        self.draining = False
        self.tokens = RouteTokens(self.config.secret)
        self.listeners: list[Listener] = []
        self._by_server: dict[tuple[str, ...], Context] = {}
        self._accepted: dict[tuple[str, str], Context] = {}
        self._addresses: set[tuple[str, int]] = set()
        self._ref = 0
        self._tag_prefix = os.urandom(4).hex()
        self._tag_seq = 0
        #: Request-URI -> (Contact line, endpoint address) of a redirect
        #: endpoint, or the endpoint to proxy to, for the snapshot it was
        #: computed from.
        self._redirects: dict[bytes, tuple[bytes, str] | Endpoint | None] = {}
        self._redirects_of: Snapshot | None = None
        #: (Route lines, Request-URI, tokens checked) -> ``_own_routes``.
        self._routed: dict[tuple[tuple[str, ...], str, bool], OwnRoutes] = {}
        #: (transport, IPv6?) of a target -> ``_listener_for``'s socket.
        self._listener_by: dict[tuple[str, bool], Listener | None] = {}
        #: (Route lines, Request-URI) of a request inside a dialog -> ``_way``.
        self._ways: dict[tuple[tuple[bytes, ...], bytes], Way | None] = {}

    def set_listeners(
        self, listeners: list[Listener], others: Iterable[tuple[str, int]] = ()
    ) -> None:
        """The sockets the shell bound: what goes in Via and Record-Route,
        and which Route URIs and Via sent-by values are this proxy's
        (``others``: the pool-side addresses of the service's other workers)."""
        self.listeners = list(listeners)
        self._routed.clear()  # which Routes are ours may change
        self._ways.clear()
        self._listener_by.clear()
        self._addresses = {(lst.host.lower(), lst.port) for lst in listeners}
        self._addresses.update((host.lower(), port) for host, port in others)

    # input ---------------------------------------------------------------
    def receive(self, data: bytes, peer: Peer, now: float) -> list[Output]:
        """Handle one datagram or one framed stream message."""
        if data[:4] == b"ACK ":
            txn = self._ack_transaction(data)
            if txn is not None:
                return self._run(txn, ACK_RECEIVED, now)  # type: ignore[return-value]
            if self.config.fast_relay:
                forwarded = self._fast_ack(data)
                if forwarded is not None:
                    return forwarded
        elif data[:4] in _FAST_METHODS:
            out = self._fast_redirect(data, peer, now)
            if out is not None:
                return out
        elif data[:4] in IN_DIALOG_STARTS and self.config.fast_relay:
            out = self._fast_in_dialog(data, peer, now)
            if out is not None:
                return out
        elif data[:8] == b"SIP/2.0 " and self.config.fast_relay:
            cfg = self.config
            scanned = scan_response(data, cfg.max_message_size, cfg.max_headers)
            if scanned is not None:
                return self._receive_response(scanned, data, now)
        elif data[:1] in _BLANK and not data.strip(_BLANK):
            return []  # keep-alive on a datagram transport (RFC 5626 §3.5.1)
        try:
            msg = self._parse(data, peer)
        except SipError as exc:
            return self._reject_malformed(exc, peer)  # type: ignore[return-value]
        if isinstance(msg, Response):
            return self._receive_response(msg, data, now)
        self.counters["requests." + msg.method] += 1
        try:
            return self._receive_request(msg, peer, now)
        except SipError as exc:
            exc.partial = msg  # type: ignore[attr-defined]
            return self._reject_malformed(exc, peer)  # type: ignore[return-value]

    def refuse(
        self,
        data: bytes,
        peer: Peer,
        status: int,
        reason: str,
        now: float,
        *,
        retry_after: int | None = None,
    ) -> list[Send]:
        """Answer a request the trust boundary refused (``proxy.admission``),
        statelessly, without routing or forwarding it.

        ``status`` is 403 (untrusted source, RFC 3261 §21.4.4) or 503 with
        ``Retry-After`` (over the rate, §21.5.4, §20.33).  The response is
        built per §8.2.6 and sent back per §18.2.2; an ACK, a response or a
        request whose Via cannot be read gets nothing (§17.2.1, §18.1.2).
        """
        try:
            req = self._parse(data, peer)
            if not isinstance(req, Request) or req.method == "ACK":
                return []
            via = req.top_via()
            vias = response_vias(req, via, peer)
        except SipError:
            return []
        diag = DIAG_UNTRUSTED if status == 403 else DIAG_RATE_LIMITED
        extra = [] if retry_after is None else [Header.make("Retry-After", str(retry_after))]
        return self._answer_statelessly(req, via, vias, peer, status, (diag, reason), extra)

    def _parse(self, data: bytes, peer: Peer) -> Request | Response:
        cfg = self.config
        return parse(
            data, stream=peer.reliable, max_size=cfg.max_message_size, max_headers=cfg.max_headers
        )

    def _answer_statelessly(
        self,
        req: Request,
        via: Via,
        vias: list[Header] | None,
        peer: Peer,
        status: int,
        diag: tuple[int, str],
        extra: list[Header],
    ) -> list[Send]:
        """A final response no transaction keeps (a refusal, a malformed
        request): §8.2.6, sent back per §18.2.2."""
        self.counters["responses.%d" % status] += 1
        extra = [self._diagnostics(*diag), *extra]
        resp = make_response(req, status, to_tag=self._new_tag(), via=vias, extra=extra)
        return [Send(bytes(resp), response_peer(via, peer))]

    def _ack_transaction(self, data: bytes) -> ServerTransaction | None:
        """The INVITE transaction an ACK belongs to, from its top Via alone.

        RFC 3261 §17.2.3 matches on the top Via's branch and sent-by, so an
        ACK for a 3xx-6xx needs no further parsing: the transaction absorbs it
        (§17.2.1).  Anything that does not match takes the full path.
        """
        m = _ACK_VIA.search(data, 0, 2048)
        if m is None:
            return None
        sent_by, branch = m.group(1).decode("latin-1"), m.group(2).decode("latin-1")
        txn = self.transactions.get((branch, sent_by.lower(), "INVITE"))
        if txn is None or txn.state not in (State.COMPLETED, State.CONFIRMED):
            return None
        return txn

    def _fast_redirect(self, data: bytes, peer: Peer, now: float) -> list[Output] | None:
        """The 302 to an everyday INVITE or SUBSCRIBE for a redirect
        endpoint (``proxy.sip.redirect``), the proxy's fast start for one
        for a proxy endpoint (``_fast_proxy``), or None: take the general
        path.

        The server transaction is the general path's own, so a
        retransmission, the ACK and a CANCEL find it whichever path made it.
        """
        if self.draining:
            return None
        # the Request-URI first: which endpoint, if any, and so which of the
        # two fast paths (either scan checks the URI again)
        start = data.find(b" ") + 1
        contact = self._redirect_of(data[start : data.find(b" ", start, 1024)])
        if type(contact) is not tuple:
            if contact is None or not self.config.fast_relay:
                return None
            return self._fast_proxy(data, peer, contact, now)  # type: ignore[arg-type]
        cfg = self.config
        if not cfg.fast_redirect:
            return None
        scanned = scan(data, cfg.max_message_size, cfg.max_headers)
        if scanned is None:
            return None
        key = (scanned.branch, scanned.sent_by, scanned.method)
        if key in self.transactions or key in self._by_server:
            return None  # a retransmission: the general path answers it
        dest = sender_peer(scanned.via_port, scanned.rport is not None, peer)  # no maddr here
        method = scanned.method
        tag = self._new_tag()
        txn_cls = InviteServerTransaction if method == "INVITE" else NonInviteServerTransaction
        txn = txn_cls(key, dest, cfg.timers, tag)
        self.transactions[key] = txn
        counters = self.counters
        counters["requests." + method] += 1
        counters["responses.302"] += 1
        counters["redirects"] += 1
        counters["redirect_by." + contact[1]] += 1
        response = build_final(scanned, _STATUS_302, contact[0], tag, peer.host, peer.port)
        return self._run(txn, ResponseSent(302, response), now)  # type: ignore[return-value]

    def _fast_proxy(
        self, data: bytes, peer: Peer, endpoint: Endpoint, now: float
    ) -> list[Output] | None:
        """An everyday INVITE or SUBSCRIBE for a proxy endpoint
        (``proxy.sip.relay.scan_invite``): the server transaction, the
        context, the 100 Trying and the RFC 3263 look-up of ``_start_proxy``,
        from one scan of its bytes; or None: take the general path.

        The context keeps the scan, which ``_forward_to`` writes the
        forwarded request from; it parses the bytes only if something asks
        for the request later (an answer of pcproxy's own, a note)."""
        cfg = self.config
        scanned = scan_invite(data, cfg.max_message_size, cfg.max_headers)
        if scanned is None:
            return None
        head = scanned.head
        key = (head.branch, head.sent_by, head.method)
        if key in self.transactions or key in self._by_server:
            return None  # a retransmission: the general path answers it
        if not scanned.one_via and self._names_me(head.vias):
            return None  # a Via of ours below the top: §16.3 step 4 decides
        method = head.method
        counters = self.counters
        counters["requests." + method] += 1
        dest = sender_peer(head.via_port, head.rport is not None, peer)  # no maddr here
        invite = method == "INVITE"
        txn_cls = InviteServerTransaction if invite else NonInviteServerTransaction
        txn = txn_cls(key, dest, cfg.timers, self._new_tag())
        self._ref += 1
        ctx = Context.of_bytes(self._ref, txn, dest, data, peer, method)
        ctx.scanned = scanned
        self.contexts[ctx.ref] = ctx
        self.transactions[key] = txn
        self._by_server[key] = ctx
        ctx.tls_name = endpoint.pool_fqdn
        ctx.record_route = cfg.record_route and method in DIALOG_CREATING
        counters["proxied"] += 1
        counters["forward_by." + endpoint.sip_address] += 1
        out: list[Output] = []
        if invite:  # §16.2
            trying = build_final(head, _STATUS_100, b"", None, peer.host, peer.port)
            out += self._run(txn, ResponseSent(100, trying), now)
        out.append(
            Resolve(ctx.ref, endpoint.pool_fqdn, endpoint.pool_port, endpoint.pool_transport)
        )
        return out

    def _names_me(self, vias: list[bytes]) -> bool:
        """Whether any of these Via lines could name this proxy: one of its
        hosts appears in them (``_is_my_via`` compares the host, so a Via
        without one of them in its text is not ours)."""
        text = b"".join(vias).decode("latin-1").lower()
        return any(host in text for host, _ in self._addresses)

    def _fast_ack(self, data: bytes) -> list[Output] | None:
        """The ACK for a 2xx of a dialog this proxy Record-Routed, forwarded
        statelessly (§16.11) from one scan of its bytes (``proxy.sip.relay``),
        or None: take the general path.

        Where an ACK goes depends on its Route set and Request-URI alone, the
        same for every ACK of the dialog, so that is remembered (``_way``);
        its Via's branch is ``stateless_unique``'s."""
        cfg = self.config
        scanned = scan_in_dialog(data, cfg.max_message_size, cfg.max_headers)
        if scanned is None:
            return None
        if (scanned.branch.decode("latin-1"), scanned.sent_by, "INVITE") in self.transactions:
            return None  # the ACK for a final response of ours
        way = self._way(scanned.routes, scanned.uri)
        if way is None:
            return None
        unique = hashlib.sha256(scanned.branch).hexdigest()[:16].encode()
        self._ref += 1  # the context the general path opens and closes
        counters = self.counters
        counters["requests.ACK"] += 1
        counters["in_dialog"] += 1
        via_line = b"Via: %s%s%s\r\n" % (way.prefix, unique, way.suffix)
        return [Send(forward_in_dialog(scanned, data, via_line), way.peer)]

    def _fast_in_dialog(self, data: bytes, peer: Peer, now: float) -> list[Output] | None:
        """A BYE, INFO, UPDATE, NOTIFY... of a dialog this proxy
        Record-Routed, forwarded from one scan of its bytes
        (``proxy.sip.relay``), or None: take the general path.

        This is what ``_receive_request``, ``_answer``, ``_route_in_dialog``
        and ``_forward_to`` do for a request whose Route lines all name this
        proxy and whose next hop needs no DNS (``_way``): the same server
        transaction, context, client transaction and timers, the same bytes
        forwarded (§16.6).  Only the parsing is left out: the context and
        the client transaction parse the bytes if something asks for the
        request later (a final response of pcproxy's own, a note), which an
        everyday request never does."""
        cfg = self.config
        scanned = scan_in_dialog(data, cfg.max_message_size, cfg.max_headers)
        if scanned is None:
            return None
        method = scanned.method
        key = (scanned.branch.decode("latin-1"), scanned.sent_by, method)
        if key in self.transactions or key in self._by_server:
            return None  # a retransmission: the general path answers it
        way = self._way(scanned.routes, scanned.uri)
        if way is None:
            return None
        counters = self.counters
        counters["requests." + method] += 1
        dest = sender_peer(scanned.via_port, scanned.rport, peer)  # no maddr here
        txn = NonInviteServerTransaction(key, dest, cfg.timers, self._new_tag())
        self._ref += 1
        ctx = Context.of_bytes(self._ref, txn, dest, data, peer, method)
        self.contexts[ctx.ref] = ctx
        self.transactions[key] = txn
        self._by_server[key] = ctx
        ctx.in_dialog = True
        counters["in_dialog"] += 1
        ctx.flow = way.flow
        ctx.tls_name = way.tls_name
        ctx.targets = [way.target]
        ctx.index = 1
        ctx.target = way.target
        unique = secrets.token_hex(10)
        via_line = b"Via: %s%s%s\r\n" % (way.prefix, unique.encode(), way.suffix)
        branch = MAGIC_COOKIE + unique
        client = NonInviteClientTransaction(
            forward_in_dialog(scanned, data, via_line), way.peer, cfg.timers, branch
        )
        client_key = (branch, method)
        ctx.client, ctx.client_key = client, client_key
        self.clients[client_key] = (client, ctx)
        counters["forwarded"] += 1
        out = self._run_client(client_key, client, ctx, client.start(), now)
        self.timers.arm(ctx, "T", cfg.target_timeout, now)
        return out

    def _way(self, routes: tuple[bytes, ...], uri: bytes) -> Way | None:
        """Where ``_route_in_dialog`` sends a request with these Route lines
        and Request-URI (``Way``); None where it would do anything else (a
        token not valid, a Route left, a name to resolve, a Request-URI
        ``_answer`` refuses).  Remembered, for the listeners it was worked
        out with."""
        memo = (routes, uri)
        try:
            return self._ways[memo]
        except KeyError:
            pass
        way = self._find_way(routes, uri)
        _remember(self._ways, memo, way, len(uri) + sum(map(len, routes)))
        return way

    def _find_way(self, routes: tuple[bytes, ...], uri: bytes) -> Way | None:
        text = uri.decode("latin-1")
        try:
            hop = parse_uri(text)  # _answer refuses a Request-URI it cannot read
            own = self._own_routes(tuple(r.decode("latin-1") for r in routes), text, True)
        except SipError:
            return None
        if not own.sides or own.routes or own.uri != text:
            return None
        # the target, listener and peer as _route_in_dialog and _forward_to
        # choose them
        flow = _client_flow(own.sides)
        if flow is not None:
            target = Target(flow.host, flow.host, flow.port, flow.transport)
            tls_name = ""
        else:
            tls_name, _, hop_target = next_hop(hop)
            if hop_target is None:
                return None  # a name to resolve
            target = hop_target
        listener = self._listener_for(target, flow)
        if listener is None:
            return None
        transport = target.transport
        name = tls_name if transport == "tls" else ""
        peer = flow or Peer(transport, target.address, target.port, listener.number, 0, name)
        prefix = "SIP/2.0/%s %s;branch=%s" % (transport.upper(), listener.hostport, MAGIC_COOKIE)
        suffix = b";rport" if transport == "udp" else b""
        return Way(prefix.encode("latin-1"), suffix, peer, target, flow, tls_name)

    def _redirect_of(self, uri: bytes) -> tuple[bytes, str] | Endpoint | None:
        """The Contact line of the 302 for this Request-URI and the
        endpoint's address, or the endpoint a request for it is proxied to,
        or None (no endpoint, or a URI to read again: the general path
        answers); remembered per snapshot."""
        if self._redirects_of is not self.snapshot:
            self._redirects = {}
            self._redirects_of = self.snapshot
        try:
            return self._redirects[uri]
        except KeyError:
            pass
        text = uri.decode("latin-1")
        try:
            parsed = parse_uri(text)
            decision = routing.decide(
                self.snapshot, parsed, self.config.default_mode, aor_key_of(text)
            )
        except UriError:
            return None
        found: tuple[bytes, str] | Endpoint | None = None
        if isinstance(decision, routing.Redirect):
            contact = decision.contact.encode("latin-1")
            found = (b"Contact: %s\r\n" % contact, decision.endpoint.sip_address)
        elif isinstance(decision, routing.Forward) and parsed.user is not None:
            found = decision.endpoint  # _answer decides only for a URI with a user
        _remember(self._redirects, uri, found, len(uri))
        return found

    def _receive_request(self, req: Request, peer: Peer, now: float) -> list[Output]:
        via = req.via or req.top_via()
        branch = via.branch
        sent_by = via.sent_by
        fallback: tuple[str, ...] = ()
        if not is_rfc3261_branch(branch):
            fallback = (
                req.uri,
                (req.from_addr.tag if req.from_addr else None) or "",
                req.get("call-id") or "",
                str(req.cseq.number if req.cseq else ""),
                sent_by,
            )
        key = transaction_key(req.method, branch, sent_by, fallback)
        txn = self.transactions.get(key)
        if req.method == "ACK":
            if txn is not None and isinstance(txn, InviteServerTransaction):
                return self._run(txn, ACK_RECEIVED, now)  # type: ignore[return-value]
            if "route" in req.keys and req.to_addr is not None and req.to_addr.tag is not None:
                # the ACK for a 2xx travels end to end, through us (§16.4, §16.11)
                routed = self._route_in_dialog(req, via, peer, None, response_peer(via, peer), now)
                if isinstance(routed, list):
                    return routed
            self.counters["ack_absorbed"] += 1
            return []
        if txn is not None:
            self.counters["retransmissions"] += 1
            return self._run(txn, REQUEST_RETRANSMITTED, now)  # type: ignore[return-value]
        if key in self._by_server:
            # the proxied INVITE's transaction ended with the 2xx; its context
            # lingers and absorbs a retransmission crossing it (RFC 6026 §7.1)
            self.counters["retransmissions"] += 1
            return []

        dest = response_peer(via, peer)
        txn_cls = InviteServerTransaction if req.method == "INVITE" else NonInviteServerTransaction
        txn = txn_cls(key, dest, self.config.timers, self._new_tag())
        answer = self._answer(req, via, peer, txn, now)
        if isinstance(answer, list):
            return answer  # proxied: the context stored the transaction
        # stored only once answered: a request _answer refuses with a SipError
        # gets a stateless 400 and must not leave a transaction behind
        self.transactions[key] = txn
        return self._run(txn, ResponseSent(answer.status, bytes(answer)), now)  # type: ignore[return-value]

    # UAS core ------------------------------------------------------------
    def _answer(
        self, req: Request, via: Via, peer: Peer, txn: ServerTransaction, now: float
    ) -> Response | list[Output]:
        """Choose the response (RFC 3261 §8.2 in order, then the table), or
        proxy the request (§16)."""
        method = req.method
        try:
            uri = parse_uri(req.uri)
        except UriError as exc:
            return self._respond(
                req, via, peer, txn, exc.status, diag=(DIAG_BAD_REQUEST, exc.reason)
            )
        to_us = uri.user is None
        if req.max_forwards == 0 and not (method == "OPTIONS" and to_us):
            return self._respond(req, via, peer, txn, 483)  # §16.3 step 3, §8.2
        if method == "CANCEL":
            return self._cancel(req, via, peer, txn, now)
        in_dialog = req.to_addr is not None and req.to_addr.tag is not None
        if in_dialog and "route" in req.keys:  # §16.4: a dialog we Record-Routed
            return self._route_in_dialog(req, via, peer, txn, txn.peer, now)
        if self.draining:
            return self._respond(req, via, peer, txn, 503, extra=[Header.make("Retry-After", "5")])
        decision: routing.Decision | None = None
        if not in_dialog and not to_us and method != "REGISTER":
            decision = routing.decide(
                self.snapshot, uri, self.config.default_mode, aor_key_of(req.uri)
            )
            if isinstance(decision, routing.Forward):  # a proxy ignores Require (§16.3)
                return self._start_proxy(req, via, peer, txn, decision, now)
        unsupported = "require" in req.keys and [
            t for t in option_tags(req.get_all("require")) if t not in SUPPORTED
        ]
        if unsupported:  # §8.2.2.3
            return self._respond(
                req, via, peer, txn, 420, extra=[Header.make("Unsupported", ", ".join(unsupported))]
            )
        if method == "REGISTER":  # §10.3: not a registrar
            return self._respond(
                req,
                via,
                peer,
                txn,
                405,
                extra=[Header.make("Allow", ALLOW)],
                diag=(DIAG_NOT_REGISTRAR, "pcproxy is not a registrar"),
            )
        if in_dialog:  # §12.2.2: no dialog of ours without our Route
            return self._respond(
                req, via, peer, txn, 481, diag=(DIAG_NO_DIALOG, "pcproxy holds no dialogs")
            )
        if method == "OPTIONS" and to_us:  # §11.2
            return self._respond(
                req,
                via,
                peer,
                txn,
                200,
                extra=[
                    Header.make("Allow", ALLOW),
                    Header.make("Accept", ACCEPT),
                    Header.make("Supported", ", ".join(sorted(SUPPORTED))),
                ],
            )
        if decision is None:
            decision = routing.decide(
                self.snapshot, uri, self.config.default_mode, aor_key_of(req.uri)
            )
        if isinstance(decision, routing.NotFound):
            self.counters["not_found"] += 1
            return self._respond(
                req,
                via,
                peer,
                txn,
                404,
                diag=(DIAG_NOT_FOUND, "No persistent chat endpoint for %s" % decision.key),
            )
        assert isinstance(decision, routing.Redirect)
        self.counters["redirects"] += 1
        self.counters["redirect_by." + decision.endpoint.sip_address] += 1
        return self._respond(
            req, via, peer, txn, 302, extra=[Header.make("Contact", decision.contact)]
        )

    def _cancel(
        self, req: Request, via: Via, peer: Peer, txn: ServerTransaction, now: float
    ) -> Response | list[Output]:
        """RFC 3261 §9.2: 200 if the INVITE's transaction exists, else 481;
        for a proxied INVITE, cancel the pending branch too (§16.10)."""
        invite_key = (
            txn.key[:-1] + ("INVITE",) if txn.key[0] != "2543" else ("2543", "INVITE", *txn.key[2:])
        )
        invite = self.transactions.get(invite_key)
        if invite is None:
            return self._respond(req, via, peer, txn, 481)
        ok = self._respond(req, via, peer, txn, 200)
        ctx = self._by_server.get(invite_key)
        if ctx is None or ctx.finished or ctx.answered:
            # a redirect server answers every INVITE at once: already past
            # PROCEEDING, the CANCEL has no effect on it
            return ok
        self.transactions[txn.key] = txn
        out: list[Output] = list(self._run(txn, ResponseSent(200, bytes(ok)), now))
        self.counters["cancelled"] += 1
        ctx.cancelled = True
        if ctx.client is None:  # no target tried yet: nothing downstream to cancel
            return out + self._finish(ctx, now)
        if ctx.provisional:
            out += self._send_cancel(ctx, now)
        # else §9.1: wait for a provisional response before sending the CANCEL
        return out

    def _respond(
        self,
        req: Request,
        via: Via,
        peer: Peer,
        txn: ServerTransaction,
        status: int,
        *,
        extra: list[Header] | None = None,
        diag: tuple[int, str] | None = None,
    ) -> Response:
        if diag is not None:
            extra = list(extra or ())
            extra.append(self._diagnostics(*diag))
        self.counters["responses.%d" % status] += 1
        return make_response(
            req, status, to_tag=txn.to_tag, via=response_vias(req, via, peer), extra=extra
        )

    # stateful proxy (§16) --------------------------------------------------
    def _start_proxy(
        self,
        req: Request,
        via: Via,
        peer: Peer,
        txn: ServerTransaction,
        decision: routing.Forward,
        now: float,
    ) -> Response | list[Output]:
        """Forward an out-of-dialog request to its endpoint's pool (§16.3-§16.6).

        The Request-URI is kept (the pool serves the endpoint's URI, as Lync's
        own endpoint contact object does); the pool's servers are the
        targets of its RFC 3263 plan.
        """
        try:
            validate_request(req, secret=self.config.secret, is_my_via=self._is_my_via)
            # a Front End's preloaded Route to pcproxy carries no token (§16.4)
            forwarded = self._pop_own_routes(req, tokens=False)[0] if "route" in req.keys else req
        except ProxyRejection as exc:
            return self._respond(req, via, peer, txn, exc.status, extra=exc.headers())
        endpoint = decision.endpoint
        ctx = self._new_context(req, forwarded, via, peer, txn, txn.peer)
        ctx.tls_name = endpoint.pool_fqdn
        ctx.record_route = self.config.record_route and req.method in DIALOG_CREATING
        self.counters["proxied"] += 1
        self.counters["forward_by." + endpoint.sip_address] += 1
        out = self._trying(ctx, now)
        out.append(
            Resolve(ctx.ref, endpoint.pool_fqdn, endpoint.pool_port, endpoint.pool_transport)
        )
        return out

    def _route_in_dialog(
        self,
        req: Request,
        via: Via,
        peer: Peer,
        txn: ServerTransaction | None,
        dest: Peer,
        now: float,
    ) -> Response | list[Output]:
        """Route a request of a dialog this proxy Record-Routed (§16.4, §16.6).

        Every leading Route that names this proxy is removed and its token
        checked (a Route naming pcproxy without a valid token: 403).  A
        request whose first Route was the pool-facing URI came from the pool
        and goes back over the client's flow when that flow is still there;
        any other goes to the next Route or the Request-URI, located by
        RFC 3263.  An ACK (for a 2xx) is forwarded statelessly (§16.11).
        """
        try:
            # a request inside a dialog follows its route set: no loop check
            # (§16.3 step 4 is for requests the proxy routes by itself)
            validate_request(req)
            routed, sides = self._pop_own_routes(req)
        except ProxyRejection as exc:
            if txn is None:
                return []
            return self._respond(req, via, peer, txn, exc.status, extra=exc.headers())
        if sides is None or not sides:
            self.counters["forged_route"] += 1
            if sides is not None:  # no Route of ours at all: not a dialog of ours
                if txn is None:
                    return []
                diag = (DIAG_NO_DIALOG, "pcproxy holds no such dialog")
                return self._respond(req, via, peer, txn, 481, diag=diag)
            note = _note("forged_route", req, via, peer=_describe_peer(peer))
            if txn is None:
                return [note]
            diag = (DIAG_FORGED_ROUTE, "Route names pcproxy without a valid token")
            resp = self._respond(req, via, peer, txn, 403, diag=diag)
            self.transactions[txn.key] = txn
            return [*self._run(txn, ResponseSent(403, bytes(resp)), now), note]
        ctx = self._new_context(req, routed, via, peer, txn, dest)
        ctx.in_dialog = True
        self.counters["in_dialog"] += 1
        flow = _client_flow(sides)
        out = self._trying(ctx, now)
        if flow is not None:
            ctx.flow = flow
            ctx.targets = [Target(flow.host, flow.host, flow.port, flow.transport)]
            return out + self._try_next(ctx, now)
        try:
            hop = parse_uri(
                NameAddr.parse(routed.get_all("route")[0]).uri
                if "route" in routed.keys
                else routed.uri
            )
        except SipError as exc:
            return out + self._own_final(ctx, 400, (DIAG_BAD_REQUEST, exc.reason), now)
        host, transport, target = next_hop(hop)
        ctx.tls_name = host
        if target is not None:
            ctx.targets = [target]
            return out + self._try_next(ctx, now)
        out.append(Resolve(ctx.ref, host, hop.port, transport))
        return out

    def _pop_own_routes(
        self, req: Request, *, tokens: bool = True
    ) -> tuple[Request, Sequence[tuple[str, Peer | None]] | None]:
        """The request without its leading Routes that name this proxy (§16.4),
        and the (side, flow) of each of their tokens; ``None`` if one of them
        carries no valid token (unless ``tokens`` is false: a preloaded Route
        of an out-of-dialog request has none).

        Every request of a dialog carries the same Route lines, so what they
        come to is remembered (``_own_routes``), for the listeners it was
        worked out with."""
        lines = tuple(raw for key, raw in zip(req.keys, req.lines, strict=True) if key == "route")
        if not lines:
            return req, []
        memo = (lines, req.uri, tokens)
        known = self._routed.get(memo)
        if known is None:
            known = self._own_routes(lines, req.uri, tokens)
            _remember(self._routed, memo, known, len(req.uri) + sum(map(len, lines)))
        if known.sides is None:
            return req, None
        if not known.changed:
            return req, known.sides  # nothing of ours at the top
        return with_routes(req, known.routes, known.uri), known.sides

    def _own_routes(self, lines: tuple[str, ...], uri: str, tokens: bool) -> OwnRoutes:
        """``_pop_own_routes`` worked out on the Route lines alone."""
        routes = list(enumerate(lines))
        received = list(routes), uri
        sides: list[tuple[str, Peer | None]] = []
        while routes:
            values = [v for _, raw in routes for v in split_commas(line_value(raw))]
            first = NameAddr.parse(values[0]).uri
            if not self._is_mine(first):
                break
            if tokens:
                token = self.tokens.check(parse_uri(first).user)
                if token is None:
                    return OwnRoutes((), uri, None, False)
                sides.append(token)
            uri = preprocess_routes(routes, uri, first.__eq__)
        return OwnRoutes(tuple(routes), uri, tuple(sides), (routes, uri) != received)

    def _new_context(
        self,
        received: Request,
        request: Request,
        via: Via,
        peer: Peer,
        txn: ServerTransaction | None,
        dest: Peer,
    ) -> Context:
        self._ref += 1
        ctx = Context(self._ref, txn, dest, request, received, via, peer)
        self.contexts[ctx.ref] = ctx
        if txn is not None:
            self.transactions[txn.key] = txn
            self._by_server[txn.key] = ctx
        return ctx

    def _trying(self, ctx: Context, now: float) -> list[Output]:
        """§16.2: a stateful proxy answers an INVITE with 100 Trying itself."""
        if ctx.server is None or ctx.method != "INVITE":
            return []
        trying = make_response(
            ctx.received, 100, via=response_vias(ctx.received, ctx.via, ctx.peer)
        )
        return list(self._run(ctx.server, ResponseSent(100, bytes(trying)), now))

    def targets_ready(self, ref: int, targets: list[Target], now: float) -> list[Output]:
        """The RFC 3263 plan for a context's request: start forwarding."""
        ctx = self.contexts.get(ref)
        if ctx is None or ctx.finished or ctx.targets is not None:
            return []
        ctx.targets = list(targets)
        return self._try_next(ctx, now)

    def resolve_failed(self, ref: int, reason: str, now: float) -> list[Output]:
        """No target could be found for a context's request."""
        ctx = self.contexts.get(ref)
        if ctx is None or ctx.finished or ctx.targets is not None:
            return []
        ctx.targets = []
        ctx.reasons.append(reason)
        note = _note("resolve_failed", ctx.received, ctx.via, host=ctx.tls_name, reason=reason)
        return [note, *self._finish(ctx, now)]

    def _try_next(self, ctx: Context, now: float) -> list[Output]:
        """Forward to the next target of the plan, or end (RFC 3263 §4.3)."""
        targets = ctx.targets or []
        while ctx.index < len(targets) and not ctx.cancelled:
            target = targets[ctx.index]
            ctx.index += 1
            sent = self._forward_to(ctx, target, now)
            if sent is not None:
                return sent
        return self._finish(ctx, now)

    def _forward_to(self, ctx: Context, target: Target, now: float) -> list[Output] | None:
        """§16.6 steps 4-11 for one target: Via, Record-Route, client transaction."""
        flow = ctx.flow if ctx.index == 1 else None
        listener = self._listener_for(target, flow)
        if listener is None:
            ctx.reasons.append(
                "%s %s: no %s listener" % (target.transport, target.address, target.transport)
            )
            return None
        cfg = self.config
        stateless = ctx.method == "ACK"
        scanned = ctx.scanned
        if scanned is not None:  # the fast path's: branch_for of the fields it read
            branch = branch_with(loop_hash(scanned.loop_fields, cfg.secret))
        elif not ctx.in_dialog:  # the branch carries the loop hash (§16.6 step 8)
            branch = branch_for(ctx.received, cfg.secret)
        elif stateless:  # §16.11: the same branch for every retransmission
            branch = MAGIC_COOKIE + stateless_unique(ctx.received)
        else:
            branch = MAGIC_COOKIE + secrets.token_hex(10)
        via_value = "SIP/2.0/%s %s;branch=%s" % (
            target.transport.upper(),
            listener.hostport,
            branch,
        )
        if target.transport == "udp":
            via_value += ";rport"
        rr = self._record_route_value(ctx, listener) if ctx.record_route else None
        fwd: Request | bytes
        if scanned is not None:
            rr_line = b"" if rr is None else b"Record-Route: %s\r\n" % rr.encode("latin-1")
            via_line = b"Via: %s\r\n" % via_value.encode("latin-1")
            fwd = forward_invite(scanned, ctx.data, via_line, rr_line)
        else:
            try:
                fwd = forward(
                    ctx.request, target_uri=None, via_value=via_value, record_route_value=rr
                )
            except SipError as exc:
                ctx.targets = []
                return self._own_final(ctx, exc.status, (DIAG_BAD_REQUEST, exc.reason), now)
        if flow is not None:
            peer = flow
        else:
            name = ctx.tls_name if target.transport == "tls" else ""
            peer = Peer(target.transport, target.address, target.port, listener.number, 0, name)
        ctx.target = target
        if stateless:
            self._done(ctx)
            return [Send(bytes(fwd), peer)]
        client: ClientTransaction
        if ctx.method == "INVITE":
            client = InviteClientTransaction(fwd, peer, cfg.timers, branch)
        else:
            client = NonInviteClientTransaction(fwd, peer, cfg.timers, branch)
        key = client_key(branch, ctx.method)
        ctx.client, ctx.client_key, ctx.provisional = client, key, False
        self.clients[key] = (client, ctx)
        self.counters["forwarded"] += 1
        if ctx.index > 1:
            self.counters["failovers"] += 1
        out = self._run_client(key, client, ctx, client.start(), now)
        self.timers.arm(ctx, "T", cfg.target_timeout, now)
        if ctx.method == "INVITE":
            self.timers.arm(ctx, "C", cfg.timer_c, now)
        return out

    def _record_route_value(self, ctx: Context, out: Listener) -> str:
        """Two Record-Route URIs (RFC 5658 §3.2): the pool-facing one on top,
        then the client-facing one with the client's flow in its token."""
        inbound = self._listener_of(ctx.peer) or out
        return "<sip:%s@%s;transport=%s;lr>, <sip:%s@%s;transport=%s;lr>" % (
            self.tokens.make("o"),
            out.hostport,
            out.transport,
            self.tokens.make("i", ctx.peer),
            inbound.hostport,
            inbound.transport,
        )

    def _listener_of(self, peer: Peer) -> Listener | None:
        stream = peer.transport != "udp"
        for lst in self.listeners:
            if lst.number == peer.listener and (lst.transport != "udp") == stream:
                if not stream or lst.transport == peer.transport:
                    return lst
        return None

    def _listener_for(self, target: Target, flow: Peer | None) -> Listener | None:
        """The socket whose address goes in the Via and Record-Route towards
        ``target``: its transport and family, else a stream listener of the
        family for TCP/TLS (the connection carries the responses back)."""
        if flow is not None:
            return self._listener_of(flow)
        v6 = ":" in target.address
        try:
            return self._listener_by[(target.transport, v6)]
        except KeyError:
            pass
        found = self._listener_by[(target.transport, v6)] = self._choose_listener(
            target.transport, v6
        )
        return found

    def _choose_listener(self, transport: str, v6: bool) -> Listener | None:
        """``_listener_for`` worked out, for ``set_listeners``' sockets."""
        family = [lst for lst in self.listeners if (":" in lst.host) == v6]
        family.sort(key=lambda lst: not lst.pool_side)  # this worker's own first
        for lst in family:
            if lst.transport == transport:
                return lst
        if transport == "udp":
            return None  # a datagram must leave by a UDP socket
        for lst in family:
            if lst.transport != "udp":
                return lst
        return family[0] if family else None

    def _is_mine(self, uri: str) -> bool:
        """A URI naming one of this proxy's listeners (or its server name)."""
        try:
            parsed = parse_uri(uri)
        except SipError:
            return False
        host = parsed.host.strip("[]").lower()
        if parsed.port is None:
            return host == self.config.server_name or any(
                (host, port) in self._addresses for port in (5060, 5061)
            )
        return (host, parsed.port) in self._addresses

    def _is_my_via(self, via: Via) -> bool:
        return (via.host.strip("[]").lower(), via.port or 5060) in self._addresses

    def _run_client(
        self,
        key: tuple[str, str],
        client: ClientTransaction,
        ctx: Context | None,
        actions: Sequence[object],
        now: float,
        msg: Response | ScannedResponse | None = None,
    ) -> list[Output]:
        out: list[Output] = []
        for action in actions:
            kind = type(action)
            if kind is Send:
                out.append(action)  # type: ignore[arg-type]
            elif kind is StartTimer:
                self.timers.arm(key, action.name, action.delay, now)  # type: ignore[attr-defined]
            elif kind is StopTimer:
                self.timers.cancel(key, action.name)  # type: ignore[attr-defined]
            elif kind is Deliver:
                if ctx is not None and msg is not None:
                    out += self._on_branch_response(ctx, client, msg, action.data, now)  # type: ignore[attr-defined]
            elif kind is TimedOut:
                if ctx is not None:
                    out += self._branch_failed(ctx, client, "no final response", now)
            elif kind is Unreachable:
                if ctx is not None:
                    out += self._branch_failed(ctx, client, "unreachable", now)
            elif kind is Terminated:
                self._end_client(key)
        return out

    def _end_client(self, key: tuple[str, str]) -> None:
        """Forget a client transaction and every timer it armed."""
        self.clients.pop(key, None)
        for name in INVITE_CLIENT_TIMERS if key[1] == "INVITE" else NON_INVITE_CLIENT_TIMERS:
            self.timers.cancel(key, name)

    def _receive_response(
        self, msg: Response | ScannedResponse, data: bytes, now: float
    ) -> list[Output]:
        """§16.7 step 1: find the client transaction; a 2xx retransmission of
        an answered INVITE is forwarded on statelessly (§16.7 step 5).

        ``msg`` is parsed by the general parser, or read by the fast path
        (``proxy.sip.relay``), which gives the same key and bytes."""
        if isinstance(msg, ScannedResponse):
            key: tuple[str, str] | None = client_key(msg.branch, msg.method)
        else:
            key = response_key(msg)
        entry = self.clients.get(key) if key is not None else None
        if entry is None:
            ctx = self._accepted.get(key) if key is not None else None
            if ctx is not None and 200 <= msg.status < 300:
                fwd = _without_own_via(msg, data, ctx.client_key[0])
                if fwd is not None:
                    return [Send(fwd, ctx.dest)]
            self.counters["responses_absorbed"] += 1
            return []
        client, ctx = entry
        assert key is not None
        try:
            actions = client.handle(ResponseReceived(msg.status, data))
        except TransactionError:
            return []
        return self._run_client(key, client, ctx, actions, now, msg)

    def _on_branch_response(
        self,
        ctx: Context,
        client: ClientTransaction,
        msg: Response | ScannedResponse,
        data: bytes,
        now: float,
    ) -> list[Output]:
        """§16.7 steps 2-10 for one response of a branch."""
        status = msg.status
        current = client is ctx.client
        if current:
            self.timers.cancel(ctx, "T")
        out: list[Output] = []
        if status < 200:
            if not current or ctx.finished:
                # a branch pcproxy moved on from (target_timeout) or that
                # outlived the answer: §16.7 step 10, CANCEL it
                return self._cancel_branch(client, now)
            ctx.provisional = True
            if ctx.cancelled and not ctx.cancel_sent:
                out += self._send_cancel(ctx, now)
            if status == 100:
                return out  # §16.7 step 5: a 100 is not forwarded
            if ctx.method == "INVITE":
                self.timers.arm(ctx, "C", self.config.timer_c, now)
            fwd = _without_own_via(msg, data, ctx.client_key[0])
            if fwd is not None:
                out += self._to_server(ctx, status, fwd, now)
            return out
        fwd = _without_own_via(msg, data, client.branch)
        if status < 300:
            if fwd is None:
                return out
            if ctx.answered or ctx.finished:  # another 2xx: forwarded as it is (§16.7 step 5)
                return [Send(fwd, ctx.dest)]
            ctx.answered = True
            self.counters["answered"] += 1
            out += self._to_server(ctx, status, fwd, now)
            if ctx.method == "INVITE":  # keep the context for the 2xx retransmissions
                for name in "TCX":  # a CANCEL sent earlier lost the race: nothing to give up
                    self.timers.cancel(ctx, name)
                self._accepted[ctx.client_key] = ctx
                self.timers.arm(ctx, "L", 64 * self.config.timers.t1, now)
                # what lingers needs only the keys and the client's address
                ctx.client, ctx.targets, ctx.finals = None, None, []
                ctx.forget()
            else:
                self._done(ctx)
            return out
        if not current or ctx.finished:
            return []
        ctx.client = None
        if fwd is not None:
            ctx.finals.append((status, fwd))
        if status == 503 and ctx.target is not None:
            ctx.reasons.append("%s: 503" % _describe(ctx.target))
            out.append(MarkFailed(ctx.target))
            out.append(self._target_failed(ctx, ctx.target, "503"))
            return out + self._try_next(ctx, now)
        return out + self._finish(ctx, now)

    def _branch_failed(
        self, ctx: Context, client: ClientTransaction | None, why: str, now: float
    ) -> list[Output]:
        """The current target refused, timed out or stayed silent: try the
        next one (RFC 3263 §4.3)."""
        if client is not ctx.client or ctx.finished:
            return []
        self.timers.cancel(ctx, "T")
        ctx.client = None
        out: list[Output] = []
        if ctx.target is not None:
            ctx.reasons.append("%s: %s" % (_describe(ctx.target), why))
            out.append(MarkFailed(ctx.target))
            out.append(self._target_failed(ctx, ctx.target, why))
        return out + self._try_next(ctx, now)

    def _target_failed(self, ctx: Context, target: Target, why: str) -> Note:
        """A pool server did not serve a request: the next one is tried
        (RFC 3263 §4.3)."""
        return _note("target_failed", ctx.received, ctx.via, target=_describe(target), reason=why)

    def transport_failed(self, peer: Peer, now: float) -> list[Output]:
        """The shell could not open a connection to ``peer`` or lost it
        (§17.1.4): every client transaction waiting on it fails."""
        out: list[Output] = []
        for key, (client, ctx) in list(self.clients.items()):
            if client.peer == peer and client.state is not ClientState.TERMINATED:
                try:
                    actions = client.handle(TransportFailed())
                except TransactionError:
                    continue
                out += self._run_client(key, client, ctx, actions, now)
        return out

    def _finish(self, ctx: Context, now: float) -> list[Output]:
        """No target left (§16.7 step 6): forward the best final response, or
        answer for the pool when none of its servers gave one."""
        if ctx.finished or ctx.answered:  # a 2xx went to the client: that was final
            return []
        codes = [status for status, _ in ctx.finals]
        if ctx.cancelled and not codes:
            return self._own_final(ctx, 487, None, now)
        best = choose_best(codes) if codes else None
        for status, data in ctx.finals:
            if status == best:
                out = self._to_server(ctx, status, data, now)
                self._done(ctx)
                return out
        self.counters["pool_unreachable"] += 1
        reasons = "; ".join(ctx.reasons) or "no target"
        note = _note("pool_unreachable", ctx.received, ctx.via, host=ctx.tls_name, reasons=reasons)
        return [
            note,
            *self._own_final(
                ctx, 503, (DIAG_POOL_UNREACHABLE, "No pool server answered: %s" % reasons), now
            ),
        ]

    def _own_final(
        self, ctx: Context, status: int, diag: tuple[int, str] | None, now: float
    ) -> list[Output]:
        """A final response pcproxy makes itself for a proxied request."""
        out: list[Output] = []
        if ctx.answered:  # a 2xx went to the client: nothing more to answer
            return out
        if ctx.server is not None and not ctx.finished:
            extra = (
                [Header.make("Retry-After", str(self.config.retry_after))]
                if status == 503
                else None
            )
            resp = self._respond(
                ctx.received, ctx.via, ctx.peer, ctx.server, status, extra=extra, diag=diag
            )
            out += self._run(ctx.server, ResponseSent(status, bytes(resp)), now)
        self._done(ctx)
        return out

    def _to_server(self, ctx: Context, status: int, data: bytes, now: float) -> list[Output]:
        if ctx.server is None:
            return [Send(data, ctx.dest)]
        if ctx.server.key not in self.transactions:  # the transaction ended (e.g. Timer H)
            return [Send(data, ctx.dest)] if 200 <= status < 300 else []
        return list(self._run(ctx.server, ResponseSent(status, data), now))

    def _send_cancel(self, ctx: Context, now: float) -> list[Output]:
        """§16.10, §9.1: CANCEL the pending branch, in a client transaction of
        its own; if the branch still has no final response after 64*T1, the
        INVITE is given up (§9.1) and the client answered."""
        client = ctx.client
        ctx.cancel_sent = True
        if client is None:
            return []
        self.timers.arm(ctx, "X", 64 * self.config.timers.t1, now)
        return self._cancel_branch(client, now)

    def _cancel_branch(self, client: ClientTransaction, now: float) -> list[Output]:
        """CANCEL one INVITE branch that has answered provisionally (§9.1)."""
        if (
            not isinstance(client, InviteClientTransaction)
            or client.state is not ClientState.PROCEEDING
        ):
            return []
        branch = client.branch
        key = client_key(branch, "CANCEL")
        if key in self.clients:
            return []  # already cancelled
        cancel = cancel_of(client.request)
        txn = NonInviteClientTransaction(cancel, client.peer, self.config.timers, branch)
        self.clients[key] = (txn, None)
        self.counters["cancels_sent"] += 1
        # §9.1: a branch still without a final response 64*T1 after its
        # CANCEL is given up (a pool server that never sends its 487)
        self.timers.arm(client_key(branch, "INVITE"), GIVE_UP, 64 * self.config.timers.t1, now)
        return self._run_client(key, txn, None, txn.start(), now)

    def _context_timer(self, ctx: Context, name: str, now: float) -> list[Output]:
        if ctx.finished:
            return []
        if name == "L":  # the 2xx retransmission window is over
            self._accepted.pop(ctx.client_key, None)
            self._done(ctx)
            return []
        if name == "T":  # the target stayed silent: try the next one
            return self._branch_failed(ctx, ctx.client, "no answer", now)
        if name == "C":  # §16.8
            if ctx.provisional and not ctx.cancel_sent:
                ctx.reasons.append("no final response within Timer C")
                return self._send_cancel(ctx, now)
            return self._branch_failed(ctx, ctx.client, "Timer C", now)
        if name == "X":  # §9.1: a CANCELled branch that never ended
            ctx.client = None
            if ctx.cancelled or ctx.finals:
                return self._finish(ctx, now)
            reason = "; ".join(ctx.reasons) or "no final response"
            return self._own_final(ctx, 408, (DIAG_POOL_UNREACHABLE, reason), now)
        return []

    def _done(self, ctx: Context) -> None:
        ctx.finished = True
        self.contexts.pop(ctx.ref, None)
        if ctx.server is not None:
            self._by_server.pop(ctx.server.key, None)
        for name in INVITE_CONTEXT_TIMERS if ctx.method == "INVITE" else "T":
            self.timers.cancel(ctx, name)

    def _reject_malformed(self, exc: SipError, peer: Peer) -> list[Send]:
        """400/505/513... where the response can be routed (§8.2, §16.3), else drop."""
        partial = getattr(exc, "partial", None)
        if isinstance(partial, Request) and partial.method != "ACK":
            vias: list[Header] | None = None
            via: Via | None
            try:
                via = partial.top_via()
                vias = response_vias(partial, via, peer)
            except SipError:
                via = _sent_by_only(partial)  # the Via lines are copied as they are
            if via is not None:
                self.counters["malformed_answered"] += 1
                return self._answer_statelessly(
                    partial, via, vias, peer, exc.status, (DIAG_BAD_REQUEST, exc.reason), []
                )
        self.counters["malformed_dropped"] += 1
        return []

    def _diagnostics(self, code: int, reason: str) -> Header:
        """``ms-diagnostics: code;reason="...";source="..."`` ([MS-SIPRE] 2.2.3).

        The reason may quote the request (a URI's decoded user part, a broken
        line), so it is cut to 200 characters and shown as printable ASCII:
        no CR/LF can end the header, no character falls outside Latin-1.
        """
        text = ascii(reason[:200])[1:-1].replace('"', "'")
        return Header.make(
            "ms-diagnostics",
            '%d;reason="%s";source="%s"' % (code, text, self.config.server_name),
        )

    # transactions and timers -------------------------------------------------
    def _run(self, txn: ServerTransaction, event: object, now: float) -> list[Send]:
        out: list[Send] = []
        actions: list[Action] = txn.handle(event)  # type: ignore[arg-type]
        for action in actions:
            if isinstance(action, Send):
                out.append(action)
            elif isinstance(action, StartTimer):
                self.timers.arm(txn.key, action.name, action.delay, now)
            elif isinstance(action, StopTimer):
                self.timers.cancel(txn.key, action.name)
            elif isinstance(action, Terminated):
                for name in "GHI" if isinstance(txn, InviteServerTransaction) else "J":
                    self.timers.cancel(txn.key, name)
                self.transactions.pop(txn.key, None)
        return out

    def in_flight(self) -> int:
        """Transactions that still owe the network something: an INVITE not yet
        ACKed, a non-INVITE not yet answered, a proxied request whose pool has
        not answered (what a drain waits for)."""
        return sum(
            1
            for t in self.transactions.values()
            if t.state in (State.PROCEEDING, State.TRYING)
            or (t.state is State.COMPLETED and isinstance(t, InviteServerTransaction))
        ) + sum(1 for c in self.contexts.values() if not c.answered and c.server is None)

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def earliest_armed(self) -> float | None:
        """The earliest deadline of the timers armed since the last call or
        the last ``next_deadline()``: a shell whose timer is due no later
        need not ask ``next_deadline()`` after every message."""
        return self.timers.earliest_armed()

    def handle_timers(self, now: float) -> list[Output]:
        out: list[Output] = []
        for owner, name in self.timers.pop_due(now):
            if type(owner) is Context:
                out += self._context_timer(owner, name, now)
            elif len(owner) == 2:  # type: ignore[arg-type]
                if name == GIVE_UP:
                    self._end_client(owner)  # type: ignore[arg-type]
                    continue
                entry = self.clients.get(owner)  # type: ignore[call-overload]
                if entry is not None:
                    client, ctx = entry
                    try:
                        actions = client.handle(TimerFired(name))
                    except TransactionError:
                        continue
                    out += self._run_client(owner, client, ctx, actions, now)  # type: ignore[arg-type]
            else:
                txn = self.transactions.get(owner)  # type: ignore[call-overload]
                if txn is not None:
                    out.extend(self._run(txn, timer_fired(name), now))
        return out

    def _new_tag(self) -> str:
        self._tag_seq += 1
        return "%s%x" % (self._tag_prefix, self._tag_seq)


def response_peer(via: Via, peer: Peer) -> Peer:
    """Where responses to this request go (RFC 3261 §18.2.2, RFC 3581 §4)."""
    if peer.reliable:
        return peer
    params = via.params
    maddr = param_value(params, "maddr")
    if maddr:
        return Peer("udp", maddr.strip("[]"), via.port or 5060, peer.listener)
    return sender_peer(via.port, param_value(params, "rport") is not None, peer)


def sender_peer(via_port: int | None, rport: bool, peer: Peer) -> Peer:
    """Where a response over UDP goes when the top Via has no maddr: the
    source address itself when the Via asks for rport (RFC 3581 §4) or names
    the source port, else the source host at the Via's port (§18.2.2)."""
    port = via_port or 5060
    if peer.reliable or port == peer.port or rport:
        return peer
    return Peer("udp", peer.host, port, peer.listener)


def _client_flow(sides: Sequence[tuple[str, Peer | None]]) -> Peer | None:
    """The client's flow when the first Route of ours was the pool-facing
    one (the request came from the pool, RFC 5658 §3.2): the flow in any of
    the tokens; else None (the request goes toward the pool)."""
    if sides[0][0] != TOWARD_CLIENT:
        return None
    return next((flow for _, flow in sides if flow is not None), None)


def next_hop(hop: SipUri) -> tuple[str, str | None, Target | None]:
    """The host of a Route or Request-URI (RFC 3263 §4: no brackets), the
    transport it names (``transport`` parameter, else TLS for sips, else
    None) and, when the host is an address, the target itself on that
    transport (UDP when none is named) and port (the URI's, else 5060 or
    5061 for TLS); None when the name must be resolved."""
    transport = hop.param("transport")
    transport = transport.lower() if transport else ("tls" if hop.scheme == "sips" else None)
    host = hop.host.strip("[]")
    if not is_address(host):
        return host, transport, None
    chosen = transport or "udp"
    port = hop.port or (5061 if chosen == "tls" else 5060)
    return host, transport, Target(host, host, port, chosen)


def _without_own_via(msg: Response | ScannedResponse, data: bytes, branch: str) -> bytes | None:
    """The response to pass on without this proxy's Via (§16.7 step 9)."""
    if isinstance(msg, ScannedResponse):
        return strip_top_via(msg, data, branch)
    return strip_own_via(msg, data, branch)


def _describe(target: Target) -> str:
    return "%s:%s:%d" % (target.transport, target.address, target.port)


def _describe_peer(peer: Peer) -> str:
    return "%s:%s:%d" % (peer.transport, peer.host, peer.port)


def _note(event: str, req: Request, via: Via, **fields: str) -> Note:
    """A ``Note`` about ``req``'s transaction: Call-ID, top Via branch and
    method first, then ``fields``.  Only these identifiers and what the
    caller passes are carried; header values such as Authorization never are."""
    head = (
        ("call_id", req.get("call-id") or ""),
        ("branch", via.branch or ""),
        ("method", req.method),
    )
    return Note(event, head + tuple(fields.items()))


def _sent_by_only(req: Request) -> Via | None:
    """Protocol and sent-by of a top Via whose parameters do not parse, so a
    400 can still reach the sender (RFC 3261 §18.2.2; RFC 4475 §3.1.2.1)."""
    value = req.get("via")
    if value is None:
        return None
    try:
        return Via.parse(value.partition(",")[0].partition(";")[0].strip())
    except SipError:
        return None


def response_vias(req: Request, via: Via, peer: Peer) -> list[Header] | None:
    """The request's Via lines with ``received``/``rport`` set on the top one
    (RFC 3261 §18.2.1, RFC 3581 §4), or None when nothing needs to change."""
    rport = via.param("rport")
    host = via.host.strip("[]")
    if rport != "" and host == peer.host:
        return None
    add = ""
    if param_value(via.params, "received") is None:
        add += ";received=" + peer.host
    vias = [Header.from_line("via", raw) for raw in req.raw_lines("via")]
    top = vias[0]
    values = split_commas(top.value)
    values[0] = (_fill_rport(values[0], peer.port) if rport == "" else values[0]) + add
    value = ", ".join(values)
    vias[0] = Header("via", top.name, value, "%s: %s" % (top.name, value))
    return vias


def _fill_rport(value: str, port: int) -> str:
    head, sep, params = value.partition(";")
    out = []
    for p in params.split(";"):
        out.append("rport=%d" % port if p.strip().lower() == "rport" else p)
    return head + sep + ";".join(out)
