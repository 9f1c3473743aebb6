"""The RFC 3261 §16 proxy rules as pure functions: bytes and requests in, bytes out.

Theory of operation
-------------------
A stateful proxy that forwards a Group Chat INVITE to a Persistent Chat pool
calls, in order:

1. ``validate_request`` (§16.3): URI scheme, Max-Forwards, loop detection,
   Proxy-Require.  A request that must not be forwarded raises a
   ``ProxyRejection`` carrying the status to answer with and the extra
   header lines that answer needs (``Unsupported`` for a 420).  Raising rather
   than returning a result follows the project's one error root: the
   transport edge already turns every ``SipError`` into a response.
2. ``preprocess_route`` (§16.4): undo a strict-routing previous hop and pop
   the top Route if it names this proxy.
3. ``branch_for`` (§16.6 step 8, §16.11): the branch of the new Via, made of
   the magic cookie, a keyed hash of the fields that affect routing (the
   loop-detection part) and a part unique to the client transaction.
4. ``forward_request`` (§16.6 steps 1-9): the bytes to send.  They are built
   from the received header lines (``Request.lines``), so every byte the
   proxy has no right to change - header order, case, compact forms,
   folding, ``epid`` and other parameters, Authorization, ms-* and unknown
   headers, the body - is what arrived.  Signatures computed downstream over
   those bytes (MS-SIPAE) still verify.
5. ``process_response`` (§16.7 step 3, §16.11): drop our Via from a response,
   and nothing else; a response whose top Via is not ours is discarded.
6. ``choose_best`` (§16.7 step 6) when every branch has ended without a
   forwarded final response; ``make_cancel`` (§9.1, §16.10) to end a pending
   branch.

Nothing here touches a socket, a clock or the transaction state: Timer C
(§16.6 step 11, §16.8), the response context and the client transactions are
the stateful glue's business.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Collection, Sequence

from proxy.sip.errors import SipError, UriError
from proxy.sip.headers import (
    MAGIC_COOKIE,
    NameAddr,
    Via,
    option_tags,
    separator_offsets,
    split_commas,
)
from proxy.sip.message import Header, Request, Response, hop_request, line_value, parse
from proxy.sip.uri import parse_uri, scheme_of

__all__ = [
    "BadExtension",
    "DEFAULT_MAX_FORWARDS",
    "LoopDetected",
    "ProxyRejection",
    "TooManyHops",
    "UnsupportedUriScheme",
    "branch_for",
    "branch_with",
    "choose_best",
    "forward",
    "forward_request",
    "loop_hash",
    "loop_part",
    "cancel_of",
    "make_cancel",
    "preprocess_route",
    "preprocess_routes",
    "with_routes",
    "process_response",
    "stateless_unique",
    "strip_own_via",
    "validate_request",
]

#: §16.6 step 3: the value of a Max-Forwards the proxy adds.
DEFAULT_MAX_FORWARDS = 70
#: Hex digits of the loop-detection part of our branches (80 bits).
LOOP_PART_LENGTH = 20
#: Separates the loop-detection part from the unique part in our branches.
_SEPARATOR = "."
_LWS = " \t"
_LWS_CRLF = " \t\r\n"


# errors ---------------------------------------------------------------------
class ProxyRejection(SipError):
    """A request that §16.3 says must not be forwarded.

    ``status`` is the response to send (§16.3 steps 2-5); ``headers()`` the
    header lines that response must carry besides the §8.2.6 ones.
    """

    def headers(self) -> list[Header]:
        return []


class UnsupportedUriScheme(ProxyRejection):
    """§16.3 step 2: a Request-URI scheme the proxy does not understand: 416."""

    status = 416


class TooManyHops(ProxyRejection):
    """§16.3 step 3: Max-Forwards is 0: 483 (Too Many Hops)."""

    status = 483


class LoopDetected(ProxyRejection):
    """§16.3 step 4: the request came back unchanged through this proxy: 482."""

    status = 482


class BadExtension(ProxyRejection):
    """§16.3 step 5: Proxy-Require names option tags this proxy does not
    support: 420, with an ``Unsupported`` header listing them (§20.40)."""

    status = 420

    def __init__(self, unsupported: list[str]) -> None:
        super().__init__("unsupported Proxy-Require: %s" % ", ".join(unsupported))
        self.unsupported = unsupported

    def headers(self) -> list[Header]:
        return [Header.make("Unsupported", ", ".join(self.unsupported))]


# §16.3 -----------------------------------------------------------------------
def validate_request(
    req: Request,
    *,
    secret: bytes | None = None,
    is_my_via: Callable[[Via], bool] | None = None,
    supported: Collection[str] = (),
) -> None:
    """Check a request before forwarding it (RFC 3261 §16.3); raise a
    ``ProxyRejection`` if it must be answered instead.

    Step 1 (reasonable syntax) is ``message.parse``'s job; step 6
    (Proxy-Authorization) is not asked of this proxy (it sits behind a
    trusted Front End).  The checks, in the RFC's order:

    * step 2: a Request-URI scheme other than sip/sips: 416;
    * step 3: ``Max-Forwards: 0``: 483, OPTIONS included (the RFC lets a
      proxy answer an OPTIONS itself; this one does not);
    * step 4, when ``secret`` and ``is_my_via`` are given: a Via this proxy
      placed (``is_my_via``, §16.3: "a sent-by value that equals a value
      placed into previous requests by the proxy") whose branch carries the
      loop-detection part this request would get now: 482.  The part is
      computed with the Via just below ours as "the topmost Via": when we
      forwarded the request, that Via was the top one we hashed (§16.6
      step 8), so an unchanged request gives the same part (a loop) and a
      request whose routing fields changed gives another (a spiral);
    * step 5: Proxy-Require option tags not in ``supported``: 420.
    """
    if scheme_of(req.uri) not in ("sip", "sips"):
        raise UnsupportedUriScheme("Request-URI scheme %r" % scheme_of(req.uri))
    if req.max_forwards == 0:
        raise TooManyHops("Max-Forwards is 0")
    if secret is not None and is_my_via is not None:
        _check_loop(req, secret, is_my_via)
    if "proxy-require" not in req.keys:
        return  # nearly every request: no lines to read
    tags = option_tags(req.get_all("proxy-require"))
    unsupported = [tag for tag in tags if tag not in supported]
    if unsupported:
        raise BadExtension(unsupported)


def _check_loop(req: Request, secret: bytes, is_my_via: Callable[[Via], bool]) -> None:
    vias = req.get_all("via")
    for index, value in enumerate(vias[:-1]):
        try:
            via = Via.parse(value)
        except SipError:
            continue  # another hop's Via: not ours, and not ours to judge
        if not is_my_via(via):
            continue
        received = _loop_part_of(via.branch)
        if received is not None and hmac.compare_digest(
            received, loop_part(req, secret, below=vias[index + 1])
        ):
            raise LoopDetected("request looped (Via %d is ours, same routing fields)" % index)


def _loop_part_of(branch: str | None) -> str | None:
    """The loop-detection part of a branch shaped by ``branch_for``."""
    if branch is None or not branch.startswith(MAGIC_COOKIE):
        return None
    part, sep, _ = branch[len(MAGIC_COOKIE) :].partition(_SEPARATOR)
    return part if sep and len(part) == LOOP_PART_LENGTH else None


# §16.6 step 8, §16.11 --------------------------------------------------------
#: The header fields §16.6 step 8 hashes besides the dialog and Via ones.
_LOOP_FIELDS = ("route", "proxy-require", "proxy-authorization")


def loop_part(req: Request, secret: bytes, *, below: str | None = None) -> str:
    """The loop-detection part of a branch (RFC 3261 §16.6 step 8).

    A keyed hash (HMAC-SHA-256, hex; §16.6 allows any hash and forbids
    base64) of the fields that affect how this proxy routes the request:
    To tag, From tag, Call-ID, CSeq number (never the method, so a CANCEL or
    ACK gets the INVITE's value), the Request-URI as received, the topmost
    Via's transport, sent-by and branch (``below``: the Via value to use
    instead of the top one, see ``validate_request``), and every Route,
    Proxy-Require and Proxy-Authorization value.  The key keeps anybody
    else from forging a value that makes us answer 482.
    """
    if below is not None:
        via = Via.parse(below)
    else:
        via = req.via or Via.parse(req.get_all("via")[0])
    to_tag = req.to_addr.tag if req.to_addr is not None else None
    from_tag = req.from_addr.tag if req.from_addr is not None else None
    fields = [
        to_tag or "",
        from_tag or "",
        req.get("call-id") or "",
        str(req.cseq.number) if req.cseq is not None else "",
        req.uri,
        "%s %s;branch=%s" % (via.transport, via.sent_by.lower(), via.branch or ""),
        *("\x00".join(req.get_all(k)) if k in req.keys else "" for k in _LOOP_FIELDS),
    ]
    return loop_hash(fields, secret)


def loop_hash(fields: list[str], secret: bytes) -> str:
    """``loop_part`` of its fields, in its order: also what a fast path
    that read them from the bytes (``proxy.sip.relay``) hashes."""
    digest = hmac.new(secret, "\x01".join(fields).encode("latin-1"), hashlib.sha256)
    return digest.hexdigest()[:LOOP_PART_LENGTH]


def branch_for(req: Request, secret: bytes, *, unique: str | None = None) -> str:
    """The branch of the Via this proxy adds (RFC 3261 §16.6 step 8, §8.1.1.7).

    ``z9hG4bK`` + the loop-detection part (``loop_part``) + ``.`` + a part
    unique to this client transaction.  A stateful proxy starts a new client
    transaction for every target and every DNS attempt (§16.6 step 7), and
    each must have its own branch, also when a request spirals through us
    again: by default the unique part is 64 random bits from ``secrets``, so
    the branch differs on every call.  A caller that forwards statelessly
    passes ``unique=stateless_unique(req)`` instead (§16.11: the same for
    every retransmission).  ``req`` is the request as received, before
    ``preprocess_route`` and retargeting (§16.6 step 8: "the Request-URI of
    the request received (before translation)"), which is also what
    ``validate_request`` hashes when the request comes back.
    """
    return branch_with(loop_part(req, secret), unique)


def branch_with(loop: str, unique: str | None = None) -> str:
    """``branch_for`` of a loop-detection part already computed (a fast
    path hashes the fields it read, ``loop_hash``)."""
    if unique is None:
        unique = secrets.token_hex(8)
    return "%s%s%s%s" % (MAGIC_COOKIE, loop, _SEPARATOR, unique)


def stateless_unique(req: Request) -> str:
    """The unique part §16.11 recommends for a stateless proxy: a hash of the
    received branch when it has the magic cookie, else of the top Via, To
    tag, From tag, Call-ID, CSeq number and Request-URI."""
    via = req.via or req.top_via()
    if via.branch is not None and via.branch.startswith(MAGIC_COOKIE):
        text = via.branch
    else:
        to_tag = req.to_addr.tag if req.to_addr is not None else None
        from_tag = req.from_addr.tag if req.from_addr is not None else None
        text = "\x01".join(
            [
                req.get_all("via")[0],
                to_tag or "",
                from_tag or "",
                req.get("call-id") or "",
                str(req.cseq.number) if req.cseq is not None else "",
                req.uri,
            ]
        )
    return hashlib.sha256(text.encode("latin-1")).hexdigest()[:16]


# §16.4 -----------------------------------------------------------------------
def preprocess_route(req: Request, is_mine: Callable[[str], bool]) -> Request:
    """Route information preprocessing (RFC 3261 §16.4); returns a new request.

    * If the Request-URI is a value this proxy put in a Record-Route
      (``is_mine(uri)``), the previous hop was a strict router: the last Route
      value becomes the Request-URI and is removed from the Route set.
    * Then, if the first Route value names this proxy, it is removed.

    A Route line that holds several values is cut at the comma, so the values
    left keep their bytes.  The maddr rule of §16.4 is not implemented: this
    proxy never puts maddr in the URIs it hands out.
    """
    routes = list(enumerate(req.raw_lines("route")))
    uri = preprocess_routes(routes, req.uri, is_mine)
    return with_routes(req, routes, uri)


#: The Route lines of a request as ``(n, raw line)``: the n-th Route line.
RouteLines = list[tuple[int, str]]


def preprocess_routes(routes: RouteLines, uri: str, is_mine: Callable[[str], bool]) -> str:
    """``preprocess_route`` on the Route lines alone (§16.4): edits ``routes``
    in place (a line cut or removed) and returns the Request-URI.  It reads
    nothing but the Route lines and the Request-URI, so a caller may keep
    its result for the next request that carries the same ones."""
    if is_mine(uri) and routes:
        n, last = routes[-1]
        values = split_commas(line_value(last))
        uri = NameAddr.parse(values[-1]).uri
        if len(values) == 1:
            del routes[-1]
        else:
            routes[-1] = (n, _drop_last_value(last))
    if routes:
        n, first = routes[0]
        values = split_commas(line_value(first))
        if is_mine(NameAddr.parse(values[0]).uri):
            if len(values) == 1:
                del routes[0]
            else:
                routes[0] = (n, _drop_first_value(first))
    return uri


def with_routes(req: Request, routes: Sequence[tuple[int, str]], uri: str) -> Request:
    """``req`` with its Route lines as ``preprocess_routes`` left them (each
    line kept, cut or removed in place) and ``uri`` as its Request-URI."""
    kept = dict(routes)
    lines: list[str] = []
    keys: list[str] = []
    n = 0
    for key, raw in zip(req.keys, req.lines, strict=True):
        if key == "route":
            edited = kept.get(n)
            n += 1
            if edited is None:
                continue
            raw = edited
        lines.append(raw)
        keys.append(key)
    return req.derive(lines, keys, uri, via=req.via, max_forwards=req.max_forwards)


# §16.6 -----------------------------------------------------------------------
def forward_request(
    req: Request,
    *,
    target_uri: str | None,
    via_value: str,
    record_route_value: str | None = None,
) -> bytes:
    """The bytes of ``forward(...)``: the request to send to one target."""
    return bytes(
        forward(
            req, target_uri=target_uri, via_value=via_value, record_route_value=record_route_value
        )
    )


def forward(
    req: Request,
    *,
    target_uri: str | None,
    via_value: str,
    record_route_value: str | None = None,
) -> Request:
    """The request to send to one target (RFC 3261 §16.6 steps 1-9).

    Built from the received header lines; only these change:

    * step 2: the Request-URI becomes ``target_uri`` (kept if None);
    * step 3: Max-Forwards is decremented in place (its name, spacing and
      position kept), or ``Max-Forwards: 70`` is added at the end;
    * step 4: ``Record-Route: <record_route_value>`` is inserted before the
      first Record-Route line, or after the last Via line if there is none;
    * step 6: if the first Route value lacks ``lr`` (a strict router), the
      Request-URI is appended to the Route set and the first Route value
      becomes the Request-URI;
    * step 8: ``Via: <via_value>`` is inserted before the first Via line;
    * step 9: ``Content-Length`` is added if absent (a stream transport
      needs it; over UDP it is harmless).

    Everything else - order, case, compact forms, folding, parameters, the
    body - is the received bytes.  ``via_value`` is the whole value, e.g.
    ``SIP/2.0/TLS 192.0.2.7:5061;branch=`` + ``branch_for(...)``.
    """
    lines, keys = list(req.lines), list(req.keys)
    uri = target_uri if target_uri is not None else req.uri

    # step 3
    if "max-forwards" in keys:
        index = keys.index("max-forwards")
        if req.max_forwards is None or req.max_forwards <= 0:
            raise TooManyHops("Max-Forwards is 0")
        lines[index] = _replace_value(lines[index], str(req.max_forwards - 1))
    else:
        lines.append("Max-Forwards: %d" % DEFAULT_MAX_FORWARDS)
        keys.append("max-forwards")

    # step 4
    if record_route_value is not None:
        if "record-route" in keys:
            at = keys.index("record-route")
        elif "via" in keys:
            at = len(keys) - keys[::-1].index("via")
        else:
            at = 0
        lines.insert(at, "Record-Route: %s" % record_route_value)
        keys.insert(at, "record-route")

    # step 6
    if "route" in keys:
        first = keys.index("route")
        values = split_commas(line_value(lines[first]))
        route_uri = NameAddr.parse(values[0]).uri
        if not _is_loose(route_uri):
            last = len(keys) - 1 - keys[::-1].index("route")
            lines.insert(last + 1, "Route: <%s>" % uri)
            keys.insert(last + 1, "route")
            if len(values) == 1:
                del lines[first], keys[first]
            else:
                lines[first] = _drop_first_value(lines[first])
            uri = route_uri

    # step 8
    at = keys.index("via") if "via" in keys else 0
    lines.insert(at, "Via: %s" % via_value)
    keys.insert(at, "via")

    # step 9
    if "content-length" not in keys:
        lines.append("Content-Length: %d" % len(req.body))
        keys.append("content-length")

    hops = req.max_forwards - 1 if req.max_forwards is not None else DEFAULT_MAX_FORWARDS
    return req.derive(lines, keys, uri, max_forwards=hops)


def _is_loose(uri: str) -> bool:
    """A Route URI with the ``lr`` parameter (§19.1.1); a URI that does not
    parse as SIP is a ``UriError``."""
    if scheme_of(uri) not in ("sip", "sips"):
        raise UriError("Route URI %r is not a SIP URI" % uri[:80], 416)
    return parse_uri(uri).param("lr") is not None


# §16.7 -----------------------------------------------------------------------
def process_response(
    resp_bytes: bytes, my_via_branch: str, *, stream: bool = False
) -> bytes | None:
    """A response as it is to be forwarded upstream (RFC 3261 §16.7 step 3).

    The top Via value is removed if its branch is ``my_via_branch``; every
    other byte stays (from the status line, as framed by ``message.parse``).
    ``None`` means "do not forward": the top Via is someone else's (§16.11:
    silently discarded), or ours was the only Via (§16.7 step 3: the response
    was meant for this element, e.g. the answer to our own CANCEL).
    Unparseable bytes raise the ``SipError`` of ``parse``.
    """
    msg = parse(resp_bytes, stream=stream)
    if not isinstance(msg, Response):
        raise SipError("not a response")
    return strip_own_via(msg, resp_bytes, my_via_branch)


def strip_own_via(msg: Response, resp_bytes: bytes, my_via_branch: str) -> bytes | None:
    """``process_response`` for a response already parsed from ``resp_bytes``."""
    via = msg.via or msg.top_via()
    if via.branch != my_via_branch:
        return None
    lines, keys = list(msg.lines), list(msg.keys)
    index = keys.index("via")
    if len(split_commas(line_value(lines[index]))) > 1:
        lines[index] = _drop_first_value(lines[index])
    else:
        del lines[index], keys[index]
        if "via" not in keys:
            return None
    text = resp_bytes.decode("latin-1")
    start = len(text) - len(text.lstrip("\r\n"))
    status_line = text[start : text.index("\r\n", start)]
    head = "%s\r\n%s\r\n\r\n" % (status_line, "\r\n".join(lines))
    return head.encode("latin-1") + msg.body


#: §16.7 step 6: in the 4xx class, "responses that provide information
#: affecting resubmission of this request".
_RESUBMISSION = (401, 407, 415, 420, 484)


def choose_best(finals: list[int]) -> int:
    """The status of the best final response (RFC 3261 §16.7 step 6).

    No final response: 408.  Any 6xx: the first 6xx received.  Otherwise the
    lowest class; within 4xx, 401, 407, 415, 420 or 484 first (in that
    order); within a class, a response other than 503 first, in arrival
    order.  A 503 chosen becomes 500: a 503 forwarded upstream would say
    this proxy cannot serve any request.  Statuses below 200 are ignored.
    A returned status that is not in ``finals`` (408, 500) is one the proxy
    generates itself; otherwise the caller forwards the first response
    received with that status.
    """
    codes = [code for code in finals if code >= 200]
    if not codes:
        return 408
    sixes = [code for code in codes if code >= 600]
    if sixes:
        return sixes[0]
    lowest = min(code // 100 for code in codes)
    klass = [code for code in codes if code // 100 == lowest]
    if lowest == 4:
        for preferred in _RESUBMISSION:
            if preferred in klass:
                return preferred
    for code in klass:
        if code != 503:
            return code
    return 500


# §9.1 ------------------------------------------------------------------------
def make_cancel(forwarded_invite_bytes: bytes) -> bytes:
    """The CANCEL for a request this proxy forwarded, from its bytes (see
    ``cancel_of``)."""
    msg = parse(forwarded_invite_bytes)
    if not isinstance(msg, Request):
        raise SipError("CANCEL needs a request")
    return cancel_of(msg)


def cancel_of(msg: Request) -> bytes:
    """The CANCEL for a request this proxy forwarded (RFC 3261 §9.1, §16.10).

    Request-URI, Call-ID, To, From and the CSeq number are the request's
    (method CANCEL); a single Via, the request's top one (ours, so the
    branch matches the server transaction downstream, §9.2); the request's
    Route lines; ``Max-Forwards: 70``; no body (``message.hop_request``).
    """
    if msg.cseq is None:
        raise SipError("CANCEL needs a request")
    if msg.method in ("ACK", "CANCEL"):
        raise SipError("an %s cannot be cancelled (§9.1)" % msg.method)
    return hop_request("CANCEL", msg, msg.raw_lines("to"))


# raw header line editing -------------------------------------------------------
def _top_level_commas(raw: str) -> list[int]:
    """Offsets in a raw header line of the commas that separate values
    (§7.3.1), outside quoted strings and ``<...>``."""
    return separator_offsets(raw, ",", angle=True, start=raw.index(":") + 1)


def _drop_first_value(raw: str) -> str:
    """``Name: a, b, c`` -> ``Name: b, c``, the bytes of ``b, c`` kept."""
    colon = raw.index(":")
    comma = _top_level_commas(raw)[0]
    return "%s %s" % (raw[: colon + 1], raw[comma + 1 :].lstrip(_LWS_CRLF))


def _drop_last_value(raw: str) -> str:
    """``Name: a, b, c`` -> ``Name: a, b``, the bytes of ``Name: a, b`` kept."""
    comma = _top_level_commas(raw)[-1]
    return raw[:comma].rstrip(_LWS_CRLF)


def _replace_value(raw: str, value: str) -> str:
    """A single-token header line with its value replaced, the name and the
    spacing around the value kept."""
    old = line_value(raw)
    colon = raw.index(":")
    at = raw.rindex(old, colon)
    return raw[:at] + value + raw[at + len(old) :]
