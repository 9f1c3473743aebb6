"""SIP requests and responses: parse from bytes, serialise back to bytes.

RFC 3261 §7 (message format), §7.3.1 (folding, combined lists), §7.5 (leading
CRLF), §18.3 (framing: Content-Length), §8.2.6 (building a response).

A message keeps every header line as it arrived (``Header.raw``): a header
that nobody changes is written back byte for byte, with its case, compact
form, folding and spacing.  Bytes are decoded as Latin-1 so that every byte is
one character and ``bytes(message)`` of an untouched message equals the
bytes that were parsed (after the framing rules: leading CRLFs dropped, bytes
past Content-Length discarded, and the empty line added that a datagram whose
end closes its header section left out).

Parsing validates what every element needs before acting (the start line, the
mandatory headers, CSeq, Max-Forwards, Content-Length); everything else is
parsed on demand.  Errors are ``SipError`` subclasses carrying the status to
answer with; a ``ParseError`` raised for a request carries the partly built
request as ``partial`` so that the caller can still route a 400 (§8.2.6 needs
only the Via to send a response back).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import NamedTuple

from proxy.sip.errors import MessageTooLarge, ParseError, SipError, VersionNotSupported
from proxy.sip.headers import CSeq, NameAddr, Via, header_key, parse_uint, split_commas

SIP_VERSION = "SIP/2.0"
MAX_MESSAGE_SIZE = 65535
MAX_HEADERS = 128
MAX_LINE = 8192

_LWS = " \t"
_METHOD_CHARS = frozenset(string.ascii_letters + string.digits + "-.!%*_+`'~")

REASONS = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    487: "Request Terminated",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
    513: "Message Too Large",
}


class Header(NamedTuple):
    """A view of one header field line: ``key`` is the canonical lower-case
    long name, ``name`` as written, ``value`` unfolded and stripped, ``raw``
    the whole line as it arrived (folds included, no final CRLF)."""

    key: str
    name: str
    value: str
    raw: str

    @classmethod
    def make(cls, name: str, value: str) -> Header:
        return cls(header_key(name), name, value, "%s: %s" % (name, value))

    @classmethod
    def from_line(cls, key: str, raw: str) -> Header:
        name, _, value = raw.partition(":")
        return cls(key, name, line_value(raw), raw)


def line_value(raw: str) -> str:
    """The value of a raw header line, unfolded (§7.3.1) and stripped."""
    value = raw[raw.index(":") + 1 :]
    if "\r\n" in value:
        value = " ".join(filter(None, (p.strip(_LWS) for p in value.split("\r\n"))))
    return value.strip(_LWS)


@dataclass(slots=True)
class _Base:
    """Header lines and body.

    ``lines`` are the raw header lines and ``keys`` their canonical names,
    index for index; values are computed on demand (``get``) so a header
    nobody reads costs nothing.  ``via``, ``from_addr``, ``to_addr`` and
    ``cseq`` are the parsed top Via, From, To and CSeq, filled in by ``parse``.
    """

    lines: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    body: bytes = b""
    via: Via | None = None
    from_addr: NameAddr | None = None
    to_addr: NameAddr | None = None
    cseq: CSeq | None = None

    @property
    def headers(self) -> list[Header]:
        return [Header.from_line(k, raw) for k, raw in zip(self.keys, self.lines, strict=True)]

    def add(self, header: Header, index: int | None = None) -> None:
        if index is None:
            self.lines.append(header.raw)
            self.keys.append(header.key)
        else:
            self.lines.insert(index, header.raw)
            self.keys.insert(index, header.key)

    def get(self, key: str) -> str | None:
        """Value of the first header with this canonical key."""
        try:
            return line_value(self.lines[self.keys.index(key)])
        except ValueError:
            return None

    def get_all(self, key: str) -> list[str]:
        """Every value of a header, combined lines split (§7.3.1)."""
        out: list[str] = []
        for k, raw in zip(self.keys, self.lines, strict=True):
            if k == key:
                out.extend(split_commas(line_value(raw)))
        return out

    def raw_lines(self, key: str) -> list[str]:
        return [raw for k, raw in zip(self.keys, self.lines, strict=True) if k == key]

    def top_via(self) -> Via:
        value = self.get("via")
        if value is None:
            raise ParseError("missing Via")
        return Via.parse(split_commas(value)[0] if "," in value else value)

    def _serialise(self, start_line: str) -> bytes:
        return ("%s\r\n%s\r\n\r\n" % (start_line, "\r\n".join(self.lines))).encode(
            "latin-1"
        ) + self.body


@dataclass(slots=True)
class Request(_Base):
    method: str = ""
    uri: str = ""
    version: str = SIP_VERSION
    max_forwards: int | None = None

    def __bytes__(self) -> bytes:
        return self._serialise("%s %s %s" % (self.method, self.uri, self.version))

    def derive(
        self,
        lines: list[str],
        keys: list[str],
        uri: str,
        *,
        via: Via | None = None,
        max_forwards: int | None = None,
    ) -> Request:
        """A copy with other header lines and Request-URI (``via`` and
        ``max_forwards`` as given): ``dataclasses.replace`` without its cost,
        paid on every hop of a proxied request."""
        return Request(
            lines,
            keys,
            self.body,
            via,
            self.from_addr,
            self.to_addr,
            self.cseq,
            self.method,
            uri,
            self.version,
            max_forwards,
        )


@dataclass(slots=True)
class Response(_Base):
    status: int = 0
    reason: str = ""
    version: str = SIP_VERSION

    def __bytes__(self) -> bytes:
        return self._serialise("%s %d %s" % (self.version, self.status, self.reason))


Message = Request | Response


def parse(
    data: bytes,
    *,
    stream: bool = False,
    max_size: int = MAX_MESSAGE_SIZE,
    max_headers: int = MAX_HEADERS,
) -> Message:
    """Parse one SIP message (RFC 3261 §7).

    ``stream`` says the bytes were framed from TCP/TLS by Content-Length
    (§18.3), so the body is exactly what follows the headers; for a datagram
    the body is cut to Content-Length, and a shorter body is an error.
    """
    if len(data) > max_size:
        raise MessageTooLarge("message of %d bytes exceeds %d" % (len(data), max_size))
    text = data.decode("latin-1")
    start = 0
    while text.startswith("\r\n", start):
        start += 2
    end = text.find("\r\n\r\n", start)
    if end < 0:
        if stream or not text.endswith("\r\n") or len(text) - 2 <= start:
            raise ParseError("no end of header section")
        end = len(text) - 2  # the end of a datagram ends its header section
    eol = text.find("\r\n", start)
    block = text[eol + 2 : end] if eol < end else ""
    try:
        msg = _parse_start_line(text[start:eol])
    except SipError as exc:
        _salvage(exc, text[start:eol], block, max_headers)
        raise
    body = data[end + 4 :]
    try:
        _parse_header_block(block, msg, max_headers)
        _validate(msg, body, stream)
    except SipError as exc:
        _attach(exc, msg)
        raise
    return msg


def parse_read(data: bytes, *, stream: bool) -> Request:
    """A request a fast path read already (``proxy.sip.relay``) or this
    process wrote, parsed when something asks for it at last: the size and
    header limits were applied to it then."""
    parsed = parse(data, stream=stream, max_size=len(data), max_headers=len(data))
    if not isinstance(parsed, Request):
        raise ParseError("not a request")
    return parsed


def _attach(exc: SipError, msg: Message) -> None:
    if isinstance(msg, Request):
        exc.partial = msg  # type: ignore[attr-defined]


def _salvage(exc: SipError, line: str, block: str, max_headers: int) -> None:
    """A request line the parser refuses still deserves an answer (400, 505)
    when the headers can be read: attach them to a partial request built
    from what the line holds (RFC 4475 §3.1.2.6, §3.1.2.7, §3.1.2.15)."""
    req = getattr(exc, "partial", None)
    if req is None:
        if line.startswith("SIP/"):
            return
        words = line.split()
        method = words[0] if words and _METHOD_CHARS.issuperset(words[0]) else ""
        req = Request(method=method, uri=words[1] if len(words) > 1 else "")
    try:
        _parse_header_block(block, req, max_headers)
    except SipError:
        if hasattr(exc, "partial"):
            del exc.partial
        return
    exc.partial = req  # type: ignore[attr-defined]


def _parse_start_line(line: str) -> Message:
    if line.startswith("SIP/"):
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not code.isdigit() or not code.isascii() or code[0] == "0":
            raise ParseError("malformed status line")
        if version != SIP_VERSION:
            raise VersionNotSupported("version %r" % version[:20])
        return Response(status=int(code), reason=reason, version=version)
    parts = line.split(" ")
    if len(parts) != 3:
        raise ParseError("malformed request line %r" % line[:80])
    method, uri, version = parts
    if not method or not _METHOD_CHARS.issuperset(method) or not uri:
        raise ParseError("malformed request line %r" % line[:80])
    req = Request(method=method, uri=uri, version=version)
    if version != SIP_VERSION:
        if not version.upper().startswith("SIP/"):
            raise ParseError("malformed request line %r" % line[:80])
        if version.upper() != SIP_VERSION:
            exc = VersionNotSupported("SIP version %r" % version[:20])
            exc.partial = req  # type: ignore[attr-defined]
            raise exc
    return req


def _parse_header_block(block: str, msg: Message, max_headers: int) -> None:
    """Split the header section into lines and name each (§7.3); folded
    lines take the slow path that joins continuations (§7.3.1)."""
    if not block:
        return
    if "\r\n " in block or "\r\n\t" in block or block[0] in " \t":
        lines = _unfold(block)
    else:
        lines = block.split("\r\n")
    if len(lines) > max_headers:
        # keep what is needed to answer (§8.2.6), then refuse
        msg.lines = lines = lines[:max_headers]
        msg.keys = _keys(lines, len(block) > MAX_LINE)
        raise MessageTooLarge("more than %d header lines" % max_headers)
    msg.lines = lines
    msg.keys = _keys(lines, len(block) > MAX_LINE)


def _keys(lines: list[str], long: bool) -> list[str]:
    """The canonical key of each line; ``long`` says a line may exceed
    ``MAX_LINE`` (no line of a shorter header section can)."""
    key_of = _KEYS.get
    keys = []
    for line in lines:
        name, colon, _ = line.partition(":")
        if not colon:
            raise ParseError("header line without ':' %r" % line[:40])
        if long and len(line) > MAX_LINE:
            raise MessageTooLarge("header line longer than %d" % MAX_LINE)
        keys.append(key_of(name) or header_key(name.rstrip(_LWS)))
    return keys


def _unfold(block: str) -> list[str]:
    """Join continuation lines to their header line, keeping the raw bytes."""
    out: list[str] = []
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not out:
                raise ParseError("continuation line before the first header")
            out[-1] += "\r\n" + line
        else:
            out.append(line)
    return out


#: Header names as usually written, mapped to their keys without validation.
_KEYS = {
    name: header_key(name)
    for name in (
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Max-Forwards",
        "Contact",
        "Content-Length",
        "Content-Type",
        "Supported",
        "Require",
        "User-Agent",
        "Route",
        "Record-Route",
        "Expires",
        "Allow",
        "Event",
        "Accept",
        "Session-Expires",
        "Proxy-Require",
        "Authorization",
        "v",
        "f",
        "t",
        "i",
        "m",
        "l",
        "c",
        "k",
        "Call-Id",
        "Cseq",
        "Max-forwards",
        "Content-length",
        "Content-type",
    )
}


def _frame_body(msg: Message, body: bytes, stream: bool, length: str | None) -> bytes:
    """Apply Content-Length (§18.3, §20.14)."""
    if length is None:
        return b"" if stream else body
    n = parse_uint(length, "Content-Length", MAX_MESSAGE_SIZE)
    if len(body) < n:
        raise ParseError("body shorter than Content-Length (%d < %d)" % (len(body), n))
    return body[:n] if len(body) > n else body


_REQUIRED = ("via", "from", "to", "call-id", "cseq")
_REQUIRED_SET = frozenset(_REQUIRED)
_SINGLE = frozenset(("from", "to", "call-id", "cseq", "max-forwards", "content-length"))


def _validate(msg: Message, body: bytes, stream: bool) -> None:
    """Checks every element makes before acting on a message (§8.2, §16.3),
    and the body framing; fills in the parsed fields of ``msg``."""
    keys, lines = msg.keys, msg.lines
    present = set(keys)
    if len(present) != len(keys):
        _check_single(keys, lines)
    if not present >= _REQUIRED_SET:
        raise ParseError("missing %s" % ", ".join(k for k in _REQUIRED if k not in present))
    first = keys.index  # the first line of a header
    cl = line_value(lines[first("content-length")]) if "content-length" in present else None
    msg.body = _frame_body(msg, body, stream, cl)
    via = line_value(lines[first("via")])
    msg.via = Via.parse(split_commas(via)[0] if "," in via else via)
    msg.cseq = cseq = CSeq.parse(line_value(lines[first("cseq")]))
    call_id = line_value(lines[first("call-id")])
    if not call_id or " " in call_id or "\t" in call_id:
        raise ParseError("malformed Call-ID")
    msg.from_addr = NameAddr.parse(line_value(lines[first("from")]))
    msg.to_addr = NameAddr.parse(line_value(lines[first("to")]))
    if isinstance(msg, Request):
        if cseq.method != msg.method:
            raise ParseError("CSeq method %r does not match %r" % (cseq.method, msg.method))
        if "max-forwards" in present:
            mf = line_value(lines[first("max-forwards")])
            msg.max_forwards = parse_uint(mf, "Max-Forwards", 255)


def _check_single(keys: list[str], lines: list[str]) -> None:
    """Refuse a second From, To, Call-ID, CSeq or Max-Forwards, and a second
    Content-Length that disagrees with the first (§7.3.1, §20)."""
    first: dict[str, str] = {}
    for key, raw in zip(keys, lines, strict=True):
        if key in first:
            if key in _SINGLE and (
                key != "content-length" or line_value(first[key]) != line_value(raw)
            ):
                raise ParseError("more than one %s header" % key)
        else:
            first[key] = raw


def hop_request(method: str, request: Request, to_lines: list[str]) -> bytes:
    """An ACK for a 3xx-6xx (RFC 3261 §17.1.1.3) or a CANCEL (§9.1) of
    ``request``: its Request-URI; a single Via, its top one (same branch, so
    the server transaction downstream matches it, §17.2.3, §9.2); its Route
    lines; ``Max-Forwards: 70``; its From and Call-ID; ``to_lines`` (the
    response's To for an ACK, the request's for a CANCEL); its CSeq number
    with ``method``; no body.  Copied lines keep their bytes.
    """
    assert request.cseq is not None, "a parsed request has a CSeq"
    first_via = request.raw_lines("via")[0]
    vias = split_commas(line_value(first_via))
    lines = ["%s %s SIP/2.0" % (method, request.uri)]
    lines.append(first_via if len(vias) == 1 else "Via: %s" % vias[0])
    lines += request.raw_lines("route")
    lines.append("Max-Forwards: 70")
    lines += request.raw_lines("from")
    lines += to_lines
    lines += request.raw_lines("call-id")
    lines.append("CSeq: %d %s" % (request.cseq.number, method))
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    via: list[Header] | None = None,
    extra: list[Header] | None = None,
    body: bytes = b"",
) -> Response:
    """Build a response to ``request`` (RFC 3261 §8.2.6).

    Via lines, From, Call-ID and CSeq are copied as received; To too, with
    ``to_tag`` added if the request's To had no tag (§8.2.6.2).  ``via``
    replaces the request's Via lines (the transport layer's ``received`` and
    ``rport``, §18.2.1, RFC 3581 §4).
    """
    lines: list[str] = []
    keys: list[str] = []
    if via is not None:
        lines += [h.raw for h in via]
        keys += ["via"] * len(via)
    copied = _COPIED_100 if status == 100 else _COPIED  # §8.2.6.1: Timestamp in a 100
    tag = to_tag if status != 100 else None
    for key, raw in zip(request.keys, request.lines, strict=True):
        if key in copied:
            if key == "via":
                if via is not None:
                    continue
            elif key == "to" and tag is not None and not _has_tag(request, raw):
                raw += ";tag=" + tag
            lines.append(raw)
            keys.append(key)
    for h in extra or ():
        lines.append(h.raw)
        keys.append(h.key)
    lines.append("Content-Length: %d" % len(body))
    keys.append("content-length")
    return Response(
        lines=lines,
        keys=keys,
        body=body,
        status=status,
        reason=reason or REASONS.get(status, "Unknown"),
    )


_COPIED = frozenset(("via", "from", "to", "call-id", "cseq"))
_COPIED_100 = _COPIED | {"timestamp"}


def _has_tag(request: Request, value: str) -> bool:
    if request.to_addr is not None:
        return request.to_addr.tag is not None
    if "tag" not in value.lower():
        return False
    try:
        return NameAddr.parse(value).tag is not None
    except SipError:
        return False
