"""The proxy's fast paths: one scan of an everyday request or response.

Theory of operation
-------------------
A stateful proxy passes every response of a call from the pool to the
client: the 180 and the 200 of the INVITE, the 200 of each BYE, INFO and
UPDATE.  For each it needs only four things (RFC 3261 §16.7): the top Via's
branch and the CSeq method, which name the client transaction (§17.1.3);
the status; and the bytes without its own top Via (step 9), which leaves
every other byte as the pool sent it.  ``scan_response`` reads those with a
few slices of the received bytes (``ScannedResponse``) and
``strip_top_via`` cuts the Via line out; the two replace, for this case, the
general parser (``proxy.sip.message``), ``response_key`` and
``strip_own_via``, and must give the very same bytes and the same key.

``scan_response`` is conservative: it returns ``None`` for anything the
general parser could read differently or refuse, and the caller takes the
general path, which handles it exactly as before.  What it accepts:

* the status line ``SIP/2.0 1xx-6xx reason`` (§7.2), no leading CRLF (§7.5);
* header lines of a token, a colon and a value, each ending in CRLF: no
  folding, no bare CR or LF (§7.3.1), at most ``max_headers`` of them;
* exactly one each of From, To, Call-ID, CSeq, at most one Max-Forwards and
  Content-Length, and at least two Via values: the pool's response carries
  pcproxy's Via on top and the client's below (§16.7 step 3), on a line of
  its own or after a comma on the same line (SIPp writes them so);
* a top Via value in the everyday form (no IPv6 sent-by) with a branch
  (§17.1.3);
* From and To name-addrs of the everyday form with a simple SIP URI, a CSeq
  of a number and a token (§20.16), a Call-ID without blanks (§20.8);
* a Content-Length the body fills exactly (§18.3): neither short, which the
  general parser refuses, nor long, which it cuts.

The requests of a dialog pcproxy Record-Routed pass through it too: the
ACK for a 2xx, which travels end to end through every proxy on the route
set (§13.2.2.4, §16.11) and is forwarded statelessly, and the BYE, INFO,
UPDATE, NOTIFY... that Group Chat's dialogs and subscriptions carry, each
in a transaction of its own.  ``scan_in_dialog`` reads an everyday one (the
same header rules, plus a To tag, a Route set, a Max-Forwards above 0 and
no Proxy-Require) and ``forward_in_dialog`` writes what ``forward`` would:
pcproxy's Via before the first Via line, Max-Forwards one less in place,
the Route lines gone.  Where it goes and the Via's text up to the branch's
unique part depend only on the Route lines and the Request-URI, which the
element works out once per dialog with the general path's own code
(``Element._way``); a request that keeps a Route of someone else's, comes
from a strict router or names a host to resolve takes the general path.
The element opens the same transactions and context as the general path
for a non-ACK one, and parses its bytes only if something asks later.

Every call starts with an INVITE (or a SUBSCRIBE) from a legacy client for
the chat URI.  ``scan_invite`` reads an everyday one: what the 100 Trying
copies (the redirect's ``Scanned``, so ``redirect.build_final`` writes it,
§16.2, §8.2.6), the fields the loop-detection hash covers in
``proxy_core.loop_part``'s order (§16.6 step 8), and where ``forward`` puts
pcproxy's Via, its Record-Route and the new Max-Forwards; ``forward_invite``
writes the request for each target from those.  A request with a Route
(§16.4), Proxy-Require (§16.3 step 5), Proxy-Authorization (hashed by
§16.6 step 8), Timestamp (copied into the 100, §8.2.6.1) or a ``maddr``
takes the general path, and so does one with a Via of pcproxy's below the
top (§16.3 step 4: the element checks the Via lines' text for its hosts).

``tests/unit/test_relay_fast.py`` holds the proof: for generated responses,
damaged ones and the RFC 4475/5118 corpus, the scan agrees with the general
parser wherever it does not give up, and an element with the fast paths
sends the same bytes as one without them through whole calls, and for
generated and damaged INVITEs, ACKs and BYEs.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.sip.redirect import Scanned
from proxy.sip.scan import (
    LWS,
    MAX_FORWARDS,
    NAME_ADDR_RE,
    NAMES,
    PROXY_REQUIRE,
    RECORD_ROUTE,
    REQUIRE,
    ROUTE,
    TO,
    VIA,
    branch_of,
    everyday_fields,
    everyday_name_addr,
    everyday_via,
    has_tag,
    header_section,
    slot_of,
    via_params,
)

#: RFC 3261 §7.2: ``SIP/2.0 200 OK``; a reason may be empty.
_STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6][0-9][0-9]) [^\r\n]*\r\n")


class ScannedResponse(NamedTuple):
    """What a proxy needs of a response to pass it on (§16.7)."""

    status: int
    #: The top Via's branch and the CSeq method: with ``client_key``, the
    #: client transaction the response belongs to (§17.1.3).
    branch: str
    method: str
    #: The offsets of the top Via line and of the line after it, and what
    #: takes its place once pcproxy's Via is gone: nothing, or the line
    #: without its first value (CRLF included).
    via_start: int
    via_end: int
    via_rest: bytes


def scan_response(data: bytes, max_size: int, max_headers: int) -> ScannedResponse | None:
    """Read an everyday response, or say ``None``: take the general path
    (see the module's docstring for what is everyday).

    Written for speed (it runs for every response a proxied call brings):
    one pass over the header lines that slices only the names."""
    section = header_section(data, _STATUS_LINE, max_size, max_headers)
    if section is None:
        return None
    start, lines, end = section
    head = start.end()
    slots: list[bytes | None] = [None, None, None, None, None, None, None, None]
    top: bytes | None = None
    vias = 0
    names = NAMES
    for raw in lines:
        colon = raw.find(b":")
        if colon < 0:
            return None
        key = names.get(raw[:colon])
        if key is None:
            key = slot_of(raw[:colon])
            if key is None:
                return None
        if key < 0 or key >= REQUIRE:
            continue  # Require, Route, Proxy-Require: read by no one in a response
        if key == VIA:
            if top is None:
                top = raw
                slots[VIA] = raw[colon + 1 :]
            vias += 1
            continue
        if slots[key] is not None:
            return None  # a second From, To, Call-ID, CSeq...: the general path decides
        slots[key] = raw[colon + 1 :]
    fields = everyday_fields(slots, len(data) - end - 4)
    if top is None or fields is None:
        return None
    top_via, from_v, to_v, _, _, method = fields
    via = everyday_via(top_via)
    if via is None or not via.group(4):
        return None
    # the top Via line: pcproxy's value first, then the client's on the same
    # line (as SIPp's [last_Via:] writes them: everyday_via's comma) or on
    # lines of their own
    comma = top_via.find(b",")
    if comma < 0:
        if vias < 2:
            return None  # no Via left to answer to (§16.7 step 3)
        rest = b""
    else:
        colon = len(top) - len(top_via) - 1
        rest = b"%s %s\r\n" % (top[: colon + 1], top_via[comma + 1 :].lstrip(b" \t\r\n"))
    branch = branch_of(via.group(4))
    if not branch:
        return None
    if not everyday_name_addr(from_v.strip(LWS)) or not everyday_name_addr(to_v.strip(LWS)):
        return None
    via_start = data.find(b"\r\n" + top + b"\r\n", head - 2) + 2
    return ScannedResponse(
        int(start.group(1)),
        branch.decode("latin-1"),
        method.decode("latin-1"),
        via_start,
        via_start + len(top) + 2,
        rest,
    )


def strip_top_via(scanned: ScannedResponse, data: bytes, my_branch: str) -> bytes | None:
    """The response to pass on (§16.7 step 9): ``data`` without its top Via
    line, when that Via is the one this proxy put in its request (its branch
    is ``my_branch``); else None, as ``strip_own_via``."""
    if scanned.branch != my_branch:
        return None
    return data[: scanned.via_start] + scanned.via_rest + data[scanned.via_end :]


#: RFC 3261 §7.1: ``ACK sip:... SIP/2.0``.
#: The request line of the requests a dialog carries through pcproxy that
#: the fast path reads (§7.1): the ACK for a 2xx, and the non-INVITE
#: requests of Group Chat's dialogs and of subscriptions.  INVITE (a
#: re-INVITE), CANCEL and anything else take the general path.
_IN_DIALOG_LINE = re.compile(
    rb"(ACK|BYE|INFO|UPDATE|NOTIFY|MESSAGE|PRACK|REFER) (sips?:[^ \r\n]+) SIP/2\.0\r\n"
)
#: How those requests begin, for the element's dispatch on four bytes.
IN_DIALOG_STARTS = frozenset((b"BYE ", b"INFO", b"UPDA", b"NOTI", b"MESS", b"PRAC", b"REFE"))
#: Max-Forwards values above 0, as written (§8.1.1.6), and what they become.
_HOPS = {str(n).encode(): str(n - 1).encode() for n in range(1, 256)}


class ScannedRequest(NamedTuple):
    """What a proxy needs of a request inside a dialog to forward it (§16.6)."""

    method: str
    uri: bytes
    #: The top Via's branch and sent-by (lower case): the key of the server
    #: transaction it belongs to (§17.2.3).
    branch: bytes
    sent_by: str
    #: The top Via's port and whether it asks for rport (RFC 3581 §4): where
    #: the responses go (§18.2.2; a Via with ``maddr`` is not read here).
    via_port: int | None
    rport: bool
    #: The raw Route lines, in order.
    routes: tuple[bytes, ...]
    #: What forwarding changes (§16.6): where the new Via goes (the first Via
    #: line), and the (start, end, replacement) of the Max-Forwards value and
    #: of every Route line, in order.
    first_via: int
    edits: list[tuple[int, int, bytes]]


def scan_in_dialog(data: bytes, max_size: int, max_headers: int) -> ScannedRequest | None:
    """Read an everyday request inside a dialog (a To tag, a Route set), or
    say ``None``: take the general path.

    What it accepts is what ``scan_response`` accepts of the header lines,
    with the request's own: the request line of an ACK, BYE, INFO, UPDATE,
    NOTIFY, MESSAGE, PRACK or REFER to a sip or sips URI (§7.1, §16.3
    step 2), a CSeq of that method (§8.1.1.5), a To with a tag (§12.2.1.1),
    a Max-Forwards above 0 (§16.3 step 3), a Content-Length, at least one
    Route line and no Proxy-Require (§16.3 step 5), a top Via value in the
    everyday form with an RFC 3261 branch (§17.2.3) and no ``maddr``
    (§18.2.2)."""
    section = header_section(data, _IN_DIALOG_LINE, max_size, max_headers)
    if section is None:
        return None
    start, lines, end = section
    slots: list[bytes | None] = [None, None, None, None, None, None, None, None]
    routes: list[bytes] = []
    edits: list[tuple[int, int, bytes]] = []
    first_via = -1
    at = start.end()
    names = NAMES
    for raw in lines:
        colon = raw.find(b":")
        if colon < 0:
            return None
        key = names.get(raw[:colon])
        if key is None:
            key = slot_of(raw[:colon])
            if key is None:
                return None
        line_at, at = at, at + len(raw) + 2
        if key < 0 or key == REQUIRE or key > PROXY_REQUIRE:
            continue
        if key == VIA:
            if first_via < 0:
                first_via = line_at
                slots[VIA] = raw[colon + 1 :]
            continue
        if key == ROUTE:
            routes.append(raw)
            edits.append((line_at, at, b""))
            continue
        if key == PROXY_REQUIRE or slots[key] is not None:
            return None  # §16.3 step 5 (420), or a second one: the general path decides
        value = raw[colon + 1 :]
        slots[key] = value
        if key == MAX_FORWARDS:
            value = value.strip(LWS)
            hops = _HOPS.get(value)
            if hops is None:
                return None  # 0 (483), or written oddly
            # the value replaced in place, its spacing kept (_replace_value)
            value_at = line_at + raw.rindex(value, colon)
            edits.append((value_at, value_at + len(value), hops))
    fields = everyday_fields(slots, len(data) - end - 4)
    method = start.group(1)
    if fields is None or fields[5] != method or slots[MAX_FORWARDS] is None or not routes:
        return None
    top_via, from_v, to_v, _, _, _ = fields
    via = everyday_via(top_via)
    if via is None or not via.group(4):
        return None
    _, host, port, paramtext = via.groups()
    params = via_params(paramtext)
    if params is None:
        return None
    branch, rport, _ = params
    if branch is None or not branch.startswith(b"z9hG4bK"):
        return None
    if not everyday_name_addr(from_v.strip(LWS)):
        return None
    to = NAME_ADDR_RE.match(to_v.strip(LWS))
    if to is None or to.group(3) is None or not has_tag(to.group(5)):
        return None
    sent_by = host.decode().lower()
    return ScannedRequest(
        method.decode(),
        start.group(2),
        branch,
        sent_by if port is None else "%s:%d" % (sent_by, int(port)),
        int(port) if port else None,
        rport is not None,
        tuple(routes),
        first_via,
        edits,
    )


def forward_in_dialog(scanned: ScannedRequest, data: bytes, via_line: bytes) -> bytes:
    """The request as ``forward`` writes it (§16.6): ``via_line`` (CRLF included)
    before the first Via line, Max-Forwards one less, the Route lines gone
    (all of them name this proxy: the caller made sure), every other byte
    as received."""
    parts: list[bytes] = []
    at = 0
    first_via = scanned.first_via
    for start, end, replacement in scanned.edits:
        if at <= first_via < start:
            parts += (data[at:first_via], via_line)
            at = first_via
        parts += (data[at:start], replacement)
        at = end
    if at <= first_via:
        parts += (data[at:first_via], via_line)
        at = first_via
    parts.append(data[at:])
    return b"".join(parts)


#: RFC 3261 §7.1: the requests a legacy client sends to the chat URI.
_OUT_OF_DIALOG_LINE = re.compile(rb"(INVITE|SUBSCRIBE) (sips?:[^ \r\n]+) SIP/2\.0\r\n")


class ScannedInvite(NamedTuple):
    """What a stateful proxy needs of an INVITE or SUBSCRIBE for the pool
    to answer it with 100 Trying and forward it (§16.2-§16.6)."""

    #: What the 100 Trying copies, as the redirect's fast path reads it
    #: (``proxy.sip.redirect.build_final``), and the server transaction's key.
    head: Scanned
    #: Every Via value of the request is on its first line: no Via below it
    #: can be one of pcproxy's (§16.3 step 4 has nothing to check).
    one_via: bool
    #: The fields of ``proxy_core.loop_part`` as the general parser reads
    #: them, in its order (§16.6 step 8; no Route, Proxy-Require or
    #: Proxy-Authorization here).
    loop_fields: list[str]
    #: Where ``forward`` puts pcproxy's Via (the first Via line) and its
    #: Record-Route (the first Record-Route line, else after the last Via
    #: line), and the (start, end, replacement) of the Max-Forwards value.
    first_via: int
    record_route_at: int
    max_forwards: tuple[int, int, bytes]


def scan_invite(data: bytes, max_size: int, max_headers: int) -> ScannedInvite | None:
    """Read an everyday INVITE or SUBSCRIBE outside a dialog, or say
    ``None``: take the general path.

    What it accepts is what ``scan_in_dialog`` accepts of the header lines,
    with: the request line ``INVITE|SUBSCRIBE sip:...`` (§7.1, §16.3 step
    2), a To without a tag (§12.2.2), no Route (§16.4 has nothing to do)
    and no Proxy-Require (§16.3 step 5), no Proxy-Authorization and no
    Timestamp (the loop-detection hash and the 100 Trying would read them,
    §16.6 step 8, §8.2.6.1), a top Via line of one value with no ``maddr``
    (§18.2.2), a Max-Forwards above 0 and a Content-Length the body fills
    exactly (§16.3 step 3, §18.3)."""
    section = header_section(data, _OUT_OF_DIALOG_LINE, max_size, max_headers)
    if section is None:
        return None
    start, lines, end = section
    slots: list[bytes | None] = [None, None, None, None, None, None, None, None]
    vias: list[bytes] = []
    copied: list[bytes] = []
    first_via = last_via = record_route_at = -1
    to_index = -1
    max_forwards = (0, 0, b"")
    at = start.end()
    names = NAMES
    for raw in lines:
        colon = raw.find(b":")
        if colon < 0:
            return None
        key = names.get(raw[:colon])
        if key is None:
            key = slot_of(raw[:colon])
            if key is None:
                return None
        line_at, at = at, at + len(raw) + 2
        if key < 0 or key == REQUIRE:
            continue  # a proxy ignores Require (§16.3)
        if key == VIA:
            if first_via < 0:
                first_via = line_at
                slots[VIA] = raw[colon + 1 :]
            last_via = at
            vias.append(raw)
            copied.append(raw)
            continue
        if key == RECORD_ROUTE:
            if record_route_at < 0:
                record_route_at = line_at
            continue
        if key > REQUIRE or slots[key] is not None:
            return None  # Route, Proxy-Require..., or a second one: the general path decides
        value = raw[colon + 1 :]
        slots[key] = value
        if key < MAX_FORWARDS:
            if key == TO:
                to_index = len(copied)
            copied.append(raw)
        elif key == MAX_FORWARDS:
            value = value.strip(LWS)
            hops = _HOPS.get(value)
            if hops is None:
                return None  # 0 (483), or written oddly
            value_at = line_at + raw.rindex(value, colon)
            max_forwards = (value_at, value_at + len(value), hops)
    fields = everyday_fields(slots, len(data) - end - 4)
    method = start.group(1)
    if fields is None or fields[5] != method or slots[MAX_FORWARDS] is None:
        return None
    top_via, from_v, to_v, call_id, number, _ = fields
    if b"," in top_via:
        return None
    via = everyday_via(top_via)
    if via is None or not via.group(4):
        return None
    transport, host, port, paramtext = via.groups()
    params = via_params(paramtext)
    if params is None:
        return None
    branch, rport, received = params
    if branch is None or not branch.startswith(b"z9hG4bK"):
        return None
    from_v = from_v.strip(LWS)
    addr = NAME_ADDR_RE.match(from_v)
    if addr is None or addr.group(3) is None:
        return None
    from_tag = _tag_of(addr.group(5))
    to = NAME_ADDR_RE.match(to_v.strip(LWS))
    if to is None or to.group(3) is None or has_tag(to.group(5)):
        return None
    host_text = host.decode()
    sent_by = host_text.lower() if port is None else "%s:%d" % (host_text.lower(), int(port))
    text_branch = branch.decode("latin-1")
    uri = start.group(2)
    head = Scanned(
        method.decode(),
        uri,
        text_branch,
        sent_by,
        host_text,
        int(port) if port else None,
        None if rport is None else rport.decode("latin-1"),
        received,
        vias,
        copied,
        to_index,
    )
    loop_fields = [
        "",
        from_tag,
        call_id.strip(LWS).decode("latin-1"),
        str(int(number)),
        uri.decode("latin-1"),
        "%s %s;branch=%s" % (transport.decode().upper(), sent_by, text_branch),
        "",
        "",
        "",
    ]
    if record_route_at < 0:
        record_route_at = last_via
    return ScannedInvite(
        head, len(vias) == 1, loop_fields, first_via, record_route_at, max_forwards
    )


def _tag_of(paramtext: bytes | None) -> str:
    """The first ``tag`` of a name-addr's parameters (as ``NAME_ADDR_RE``
    matched them) as ``NameAddr.tag`` reads it, "" for none or no value."""
    for item in (paramtext or b";")[1:].split(b";"):
        name, _, value = item.partition(b"=")
        if name.lower() == b"tag":
            return value.decode("latin-1")
    return ""


def forward_invite(scanned: ScannedInvite, data: bytes, via_line: bytes, rr_line: bytes) -> bytes:
    """The request as ``forward`` writes it (§16.6): ``via_line`` before the
    first Via line, ``rr_line`` (empty for none) before the first
    Record-Route line or after the last Via line, Max-Forwards one less in
    place, every other byte as received (CRLF included in both lines)."""
    mf_start, mf_end, hops = scanned.max_forwards
    edits = sorted(
        [
            (scanned.first_via, scanned.first_via, via_line),
            (scanned.record_route_at, scanned.record_route_at, rr_line),
            (mf_start, mf_end, hops),
        ]
    )
    parts: list[bytes] = []
    at = 0
    for begin, stop, replacement in edits:
        parts += (data[at:begin], replacement)
        at = stop
    parts.append(data[at:])
    return b"".join(parts)
