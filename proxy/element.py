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

Until the proxy core exists every endpoint, whatever its mode, is answered
with a redirect.
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from operator import itemgetter

from proxy import routing
from proxy.sip.errors import SipError, UriError
from proxy.sip.headers import Via, option_tags, param_value, split_commas
from proxy.sip.message import Header, Request, Response, make_response, parse
from proxy.sip.peer import Peer, Send
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
    Timers,
    is_rfc3261_branch,
    timer_fired,
    transaction_key,
)
from proxy.sip.uri import aor_key_of, parse_uri
from proxy.store import Snapshot

ALLOW = "INVITE, ACK, CANCEL, OPTIONS, SUBSCRIBE, NOTIFY, INFO, UPDATE, BYE, MESSAGE"
ACCEPT = "application/sdp"
SUPPORTED: frozenset[str] = frozenset()

#: ms-diagnostics codes of pcproxy's own answers (see README).
DIAG_NOT_FOUND = 52001
DIAG_NOT_REGISTRAR = 52002
DIAG_NO_DIALOG = 52003
DIAG_BAD_REQUEST = 52004


@dataclass(frozen=True, slots=True)
class ElementConfig:
    default_mode: str = "redirect"
    server_name: str = "pcproxy.invalid"
    timers: Timers = Timers()
    max_message_size: int = 65535
    max_headers: int = 128


#: What a keep-alive datagram is made of (RFC 5626 §3.5.1).
_BLANK = b"\r\n\t "

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

    ``next_deadline()`` looks at every FIFO; ``earliest_armed()`` only says
    how early the timers armed since the last of those calls are due, which
    is all a shell whose own timer already covers the older ones needs.
    """

    __slots__ = ("_queues", "_armed", "_earliest_new")

    def __init__(self) -> None:
        self._queues: dict[float, OrderedDict[tuple[object, str], float]] = {}
        self._armed: dict[tuple[object, str], float] = {}
        self._earliest_new: float | None = None

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, owner: object, name: str, delay: float, now: float) -> None:
        entry = (owner, name)
        armed = self._armed
        old = armed.pop(entry, None)
        if old is not None:
            del self._queues[old][entry]
        queue = self._queues.get(delay)
        if queue is None:
            queue = self._queues[delay] = OrderedDict()
        queue[entry] = at = now + delay
        armed[entry] = delay
        earliest = self._earliest_new
        if earliest is None or at < earliest:
            self._earliest_new = at

    def earliest_armed(self) -> float | None:
        """The earliest deadline armed since the last call or the last
        ``next_deadline()`` (None if none was), then forget it."""
        at, self._earliest_new = self._earliest_new, None
        return at

    def cancel(self, owner: object, name: str) -> None:
        entry = (owner, name)
        delay = self._armed.pop(entry, None)
        if delay is not None:
            del self._queues[delay][entry]

    def next_deadline(self) -> float | None:
        self._earliest_new = None
        best: float | None = None
        for queue in self._queues.values():
            if queue:
                at = next(iter(queue.values()))
                if best is None or at < best:
                    best = at
        return best

    def pop_due(self, now: float) -> list[tuple[object, str]]:
        due: list[tuple[float, tuple[object, str]]] = []
        for queue in self._queues.values():
            while queue:
                entry, at = next(iter(queue.items()))
                if at > now:
                    break
                del queue[entry]
                del self._armed[entry]
                due.append((at, entry))
        due.sort(key=itemgetter(0))
        return [entry for _, entry in due]


class Element:
    """A redirect server (RFC 3261 §8.2, §8.3) over server transactions."""

    def __init__(self, snapshot: Snapshot, config: ElementConfig | None = None) -> None:
        self.snapshot = snapshot
        self.config = config or ElementConfig()
        self.transactions: dict[tuple[str, ...], ServerTransaction] = {}
        self.timers = TimerQueue()
        self.counters: Counter[str] = Counter()
        self.draining = False
        self._tag_prefix = os.urandom(4).hex()
        self._tag_seq = 0

    # input ---------------------------------------------------------------
    def receive(self, data: bytes, peer: Peer, now: float) -> list[Send]:
        """Handle one datagram or one framed stream message."""
        if data[:4] == b"ACK ":
            txn = self._ack_transaction(data)
            if txn is not None:
                return self._run(txn, ACK_RECEIVED, now)
        elif data[:1] in _BLANK and not data.strip(_BLANK):
            return []  # keep-alive on a datagram transport (RFC 5626 §3.5.1)
        cfg = self.config
        try:
            msg = parse(
                data,
                stream=peer.reliable,
                max_size=cfg.max_message_size,
                max_headers=cfg.max_headers,
            )
        except SipError as exc:
            return self._reject_malformed(exc, peer)
        if isinstance(msg, Response):
            self.counters["responses_absorbed"] += 1
            return []
        self.counters["requests." + msg.method] += 1
        try:
            return self._receive_request(msg, peer, now)
        except SipError as exc:
            exc.partial = msg  # type: ignore[attr-defined]
            return self._reject_malformed(exc, peer)

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

    def _receive_request(self, req: Request, peer: Peer, now: float) -> list[Send]:
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
                return self._run(txn, ACK_RECEIVED, now)
            self.counters["ack_absorbed"] += 1
            return []  # an ACK to a 2xx is end to end; we never send a 2xx to INVITE
        if txn is not None:
            self.counters["retransmissions"] += 1
            return self._run(txn, REQUEST_RETRANSMITTED, now)

        dest = response_peer(via, peer)
        txn_cls = InviteServerTransaction if req.method == "INVITE" else NonInviteServerTransaction
        txn = txn_cls(key, dest, self.config.timers, self._new_tag())
        response = self._answer(req, via, peer, txn)
        # stored only once answered: a request _answer refuses with a SipError
        # gets a stateless 400 and must not leave a transaction behind
        self.transactions[key] = txn
        return self._run(txn, ResponseSent(response.status, bytes(response)), now)

    # UAS core ------------------------------------------------------------
    def _answer(self, req: Request, via: Via, peer: Peer, txn: ServerTransaction) -> Response:
        """Choose the response (RFC 3261 §8.2 in order, then the table)."""
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
            return self._cancel(req, via, peer, txn)
        if self.draining:
            return self._respond(req, via, peer, txn, 503, extra=[Header.make("Retry-After", "5")])
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
        if req.to_addr is not None and req.to_addr.tag is not None:  # §12.2.2: no dialogs here
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
        decision = routing.decide(self.snapshot, uri, self.config.default_mode, aor_key_of(req.uri))
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
        endpoint = decision.endpoint
        contact = (
            decision.contact
            if isinstance(decision, routing.Redirect)
            else routing.pool_contact(uri, endpoint)
        )
        self.counters["redirects"] += 1
        return self._respond(req, via, peer, txn, 302, extra=[Header.make("Contact", contact)])

    def _cancel(self, req: Request, via: Via, peer: Peer, txn: ServerTransaction) -> Response:
        """RFC 3261 §9.2: 200 if the INVITE's transaction exists, else 481."""
        invite_key = (
            txn.key[:-1] + ("INVITE",) if txn.key[0] != "2543" else ("2543", "INVITE", *txn.key[2:])
        )
        invite = self.transactions.get(invite_key)
        if invite is None:
            return self._respond(req, via, peer, txn, 481)
        # a redirect server answers every INVITE at once, so the INVITE is
        # already past PROCEEDING and the CANCEL has no effect on it
        return self._respond(req, via, peer, txn, 200)

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
                self.counters["responses.%d" % exc.status] += 1
                self.counters["malformed_answered"] += 1
                extra = [self._diagnostics(DIAG_BAD_REQUEST, exc.reason)]
                resp = make_response(
                    partial,
                    exc.status,
                    to_tag=self._new_tag(),
                    via=vias,
                    extra=extra,
                )
                return [Send(bytes(resp), response_peer(via, peer))]
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
                for name in ("G", "H", "I", "J"):
                    self.timers.cancel(txn.key, name)
                self.transactions.pop(txn.key, None)
        return out

    def in_flight(self) -> int:
        """Transactions that still owe the network something: an INVITE not yet
        ACKed, a non-INVITE not yet answered (what a drain waits for)."""
        return sum(
            1
            for t in self.transactions.values()
            if t.state in (State.PROCEEDING, State.TRYING)
            or (t.state is State.COMPLETED and isinstance(t, InviteServerTransaction))
        )

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def earliest_armed(self) -> float | None:
        """The earliest deadline of the timers armed since the last call or
        the last ``next_deadline()``: a shell whose timer is due no later
        need not ask ``next_deadline()`` after every message."""
        return self.timers.earliest_armed()

    def handle_timers(self, now: float) -> list[Send]:
        out: list[Send] = []
        for owner, name in self.timers.pop_due(now):
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
    port = via.port or 5060
    if port == peer.port or param_value(params, "rport") is not None:
        return peer  # the source address itself
    return Peer("udp", peer.host, port, peer.listener)


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
