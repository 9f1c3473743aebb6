"""Builders for the SIP messages the unit tests send, readers for what comes back.

Every builder returns wire bytes with CRLF line endings and a correct
Content-Length unless told otherwise, so a test only spells out the part of
the message it is about.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.element import Element, ElementConfig, Note
from proxy.sip.peer import Peer, Send
from proxy.sip.transaction import Timers
from proxy.sip.uri import AddressOfRecord
from proxy.store import Endpoint, Snapshot

CHAT_URI = "sip:ocschat@contoso.com"
POOL = "pcpool.contoso.com"
CLIENT_VIA = "SIP/2.0/UDP 127.0.0.1:5060"
UDP_PEER = Peer("udp", "127.0.0.1", 5060)
TCP_PEER = Peer("tcp", "127.0.0.1", 50123, listener=1, conn=7)
TIMERS = Timers(t1=0.5, t2=4.0, t4=5.0)

#: "auto": the length of the body; None: no Content-Length header at all.
AUTO = "auto"


def request(
    method: str = "INVITE",
    uri: str = CHAT_URI,
    *,
    branch: str = "z9hG4bK-1",
    via: str | None = None,
    from_: str = '"Alice" <sip:alice@contoso.com>;tag=a1',
    to: str | None = None,
    call_id: str = "call-1@client.contoso.com",
    cseq: int = 1,
    cseq_method: str | None = None,
    max_forwards: int | None = 70,
    extra: tuple[str, ...] = (),
    body: bytes = b"",
    content_length: int | str | None = AUTO,
    version: str = "SIP/2.0",
) -> bytes:
    """A request with the mandatory headers (RFC 3261 §8.1.1) in the usual order."""
    lines = [
        "%s %s %s" % (method, uri, version),
        "Via: %s" % (via if via is not None else "%s;branch=%s" % (CLIENT_VIA, branch)),
    ]
    if max_forwards is not None:
        lines.append("Max-Forwards: %d" % max_forwards)
    lines += [
        "From: %s" % from_,
        "To: %s" % (to if to is not None else "<%s>" % uri),
        "Call-ID: %s" % call_id,
        "CSeq: %d %s" % (cseq, cseq_method or method),
        *extra,
    ]
    return _finish(lines, body, content_length)


def response(
    status: int = 200,
    reason: str = "OK",
    *,
    via: str = CLIENT_VIA + ";branch=z9hG4bK-1",
    cseq_method: str = "INVITE",
    extra: tuple[str, ...] = (),
    body: bytes = b"",
    content_length: int | str | None = AUTO,
) -> bytes:
    """A response as a UAS would send it back to us."""
    lines = [
        "SIP/2.0 %d %s" % (status, reason) if reason else "SIP/2.0 %d" % status,
        "Via: %s" % via,
        "From: <sip:alice@contoso.com>;tag=a1",
        "To: <%s>;tag=b2" % CHAT_URI,
        "Call-ID: call-1@client.contoso.com",
        "CSeq: 1 %s" % cseq_method,
        *extra,
    ]
    return _finish(lines, body, content_length)


def _finish(lines: list[str], body: bytes, content_length: int | str | None) -> bytes:
    if content_length == AUTO:
        lines.append("Content-Length: %d" % len(body))
    elif content_length is not None:
        lines.append("Content-Length: %s" % content_length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ack_for(invite: bytes, final: bytes) -> bytes:
    """The ACK a client sends for a non-2xx final response (RFC 3261 §17.1.1.3):
    the INVITE's Request-URI, top Via, From, Call-ID and CSeq number, and the
    response's To (with its tag)."""
    start, _, rest = invite.partition(b"\r\n")
    uri = start.split(b" ")[1]
    lines = [b"ACK " + uri + b" SIP/2.0"]
    for line in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name = line.split(b":", 1)[0].lower()
        if name in (b"via", b"from", b"call-id", b"max-forwards"):
            lines.append(line)
        elif name == b"cseq":
            lines.append(line.rsplit(b" ", 1)[0] + b" ACK")
    lines.append(b"To: " + header(final, "To"))
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def cancel_for(invite: bytes) -> bytes:
    """The CANCEL for an INVITE (RFC 3261 §9.1): same Request-URI, top Via,
    From, To, Call-ID and CSeq number, method CANCEL."""
    start, _, rest = invite.partition(b"\r\n")
    uri = start.split(b" ")[1]
    lines = [b"CANCEL " + uri + b" SIP/2.0"]
    for line in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name = line.split(b":", 1)[0].lower()
        if name in (b"via", b"from", b"to", b"call-id", b"max-forwards"):
            lines.append(line)
        elif name == b"cseq":
            lines.append(line.rsplit(b" ", 1)[0] + b" CANCEL")
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


# reading what the element sent ------------------------------------------------
def status_of(data: bytes) -> int:
    """The status code of a response's status line."""
    m = re.match(rb"SIP/2\.0 ([0-9]{3}) ", data)
    assert m is not None, data[:80]
    return int(m.group(1))


def headers(data: bytes, name: str) -> list[bytes]:
    """Every value of the header lines called ``name`` (case-insensitive, no
    compact forms), as bytes, in order."""
    head = data.split(b"\r\n\r\n", 1)[0]
    wanted = name.lower().encode()
    out = []
    for line in head.split(b"\r\n")[1:]:
        hname, _, value = line.partition(b":")
        if hname.strip().lower() == wanted:
            out.append(value.strip())
    return out


def header(data: bytes, name: str) -> bytes:
    """The value of the one header called ``name``."""
    values = headers(data, name)
    assert len(values) == 1, (name, values)
    return values[0]


def header_line(data: bytes, name: str) -> bytes:
    """The whole header line called ``name``, as it is on the wire."""
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        if line.partition(b":")[0].strip().lower() == name.lower().encode():
            return line
    raise AssertionError("no %s header in %r" % (name, data[:200]))


def to_tag(data: bytes) -> bytes | None:
    m = re.search(rb";tag=([^;\s]+)", header(data, "To"))
    return m.group(1) if m else None


# the element under test -----------------------------------------------------------
def endpoint(
    aor: str = CHAT_URI,
    pool: str = POOL,
    *,
    pool_port: int | None = None,
    pool_transport: str | None = None,
) -> Endpoint:
    """A row of the endpoint table, keyed the way the store keys it."""
    parsed = AddressOfRecord.parse(aor)
    return Endpoint(
        parsed.text,
        parsed.key,
        pool,
        None,
        None,
        pool_port,
        pool_transport,  # type: ignore[arg-type]
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z",
    )


def snapshot(*endpoints: Endpoint) -> Snapshot:
    return Snapshot({e.key: e for e in endpoints}, 1)


def make_element(*endpoints: Endpoint, **config: object) -> Element:
    """An element serving ``endpoints`` (by default the chat URI at the pool)."""
    eps = endpoints or (endpoint(),)
    cfg = ElementConfig(timers=TIMERS, **config)  # type: ignore[arg-type]
    return Element(snapshot(*eps), cfg)


def sends(actions: Sequence[object]) -> list[Send]:
    """The element's actions, which for a redirect are all ``Send`` (and a
    ``Note`` for the log when a Route was forged)."""
    assert all(type(a) in (Send, Note) for a in actions), actions
    return [a for a in actions if isinstance(a, Send)]


# a UAS answering what the element forwarded -----------------------------------------
#: Compact header names (RFC 3261 §7.3.3) that a reply copies.
_LONG_NAMES = {b"v": b"via", b"f": b"from", b"t": b"to", b"i": b"call-id", b"m": b"contact"}


def header_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """(long lower-case name, value) of every header line, folds joined
    (RFC 3261 §7.3.1), in order; values as written apart from the fold."""
    head = data.split(b"\r\n\r\n", 1)[0]
    out: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
            continue
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        out.append((_LONG_NAMES.get(key, key), value.strip()))
    return out


def field_values(data: bytes, name: str) -> list[bytes]:
    """Every value of the header ``name`` (long form; compact forms and
    folded lines understood), one entry per line."""
    wanted = name.lower().encode()
    return [value for key, value in header_fields(data) if key == wanted]


def reply_to(
    req: bytes,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    extra: tuple[str, ...] = (),
    record_route: bool = False,
) -> bytes:
    """The response a UAS makes for ``req`` (RFC 3261 §8.2.6): its Via lines
    as they arrived, From, To (with ``to_tag`` when it had none), Call-ID,
    CSeq, and its Record-Route lines when ``record_route`` (§12.1.1)."""
    head = req.split(b"\r\n\r\n", 1)[0]
    lines = [b"SIP/2.0 %d %s" % (status, reason.encode())]
    copied = [b"via", b"from", b"to", b"call-id", b"cseq"]
    if record_route:
        copied.append(b"record-route")
    raw_lines: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            raw_lines[-1] += b"\r\n" + line
        else:
            raw_lines.append(line)
    for line in raw_lines:
        key = line.partition(b":")[0].strip().lower()
        key = _LONG_NAMES.get(key, key)
        if key not in copied:
            continue
        if key == b"to" and to_tag is not None and b";tag=" not in line:
            line += b";tag=" + to_tag.encode()
        lines.append(line)
    lines += [e.encode("latin-1") for e in extra]
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"
