"""SIP requests and responses: parse from bytes, serialise back to bytes.

RFC 3261 §7 (message format), §7.3.1 (folding, combined lists), §7.5 (leading
CRLF), §18.3 (framing: Content-Length), §8.2.6 (building a response).

A message keeps every header line as it arrived (``Header.raw``): a header
that nobody changes is written back byte for byte, with its case, compact
form, folding and spacing.  Bytes are decoded as Latin-1 so that every byte is
one character and ``bytes(message)`` of an untouched message equals the
bytes that were parsed (after the framing rules: leading CRLFs dropped, bytes
past Content-Length discarded).

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


@dataclass(slots=True)
class Header:
    """One header field line: ``key`` is the canonical lower-case long name,
    ``name`` as written, ``value`` unfolded and stripped, ``raw`` the whole
    line as it arrived (folds included, no final CRLF)."""

    key: str
    name: str
    value: str
    raw: str

    @classmethod
    def make(cls, name: str, value: str) -> Header:
        return cls(header_key(name), name, value, "%s: %s" % (name, value))


@dataclass(slots=True)
class _Base:
    """Headers and body; ``via``, ``from_addr``, ``to_addr`` and ``cseq`` are
    the parsed top Via, From, To and CSeq, filled in by ``parse``."""

    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    via: Via | None = None
    from_addr: NameAddr | None = None
    to_addr: NameAddr | None = None
    cseq: CSeq | None = None

    def get(self, key: str) -> str | None:
        """Value of the first header with this canonical key."""
        for h in self.headers:
            if h.key == key:
                return h.value
        return None

    def get_all(self, key: str) -> list[str]:
        """Every value of a header, combined lines split (§7.3.1)."""
        out: list[str] = []
        for h in self.headers:
            if h.key == key:
                out.extend(split_commas(h.value))
        return out

    def lines(self, key: str) -> list[Header]:
        return [h for h in self.headers if h.key == key]

    def top_via(self) -> Via:
        for h in self.headers:
            if h.key == "via":
                return Via.parse(split_commas(h.value)[0] if "," in h.value else h.value)
        raise ParseError("missing Via")

    def _serialise(self, start_line: str) -> bytes:
        parts = [start_line]
        for h in self.headers:
            parts.append(h.raw)
        parts.append("")
        parts.append("")
        return "\r\n".join(parts).encode("latin-1") + self.body


@dataclass(slots=True)
class Request(_Base):
    method: str = ""
    uri: str = ""
    version: str = SIP_VERSION

    def __bytes__(self) -> bytes:
        return self._serialise("%s %s %s" % (self.method, self.uri, self.version))


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
        raise ParseError("no end of header section")
    head = text[start:end].split("\r\n")
    body = data[end + 4 :]

    msg = _parse_start_line(head[0])
    headers = msg.headers
    if len(head) - 1 > max_headers:
        # keep what is needed to answer (§8.2.6), then refuse
        _parse_header_lines(head[1 : max_headers + 1], headers)
        err: SipError = MessageTooLarge("more than %d header lines" % max_headers)
        _attach(err, msg)
        raise err
    try:
        _parse_header_lines(head[1:], headers)
        msg.body = _frame_body(msg, body, stream)
        _validate(msg)
    except SipError as exc:
        _attach(exc, msg)
        raise
    return msg


def _attach(exc: SipError, msg: Message) -> None:
    if isinstance(msg, Request):
        exc.partial = msg  # type: ignore[attr-defined]


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


def _parse_header_lines(lines: list[str], headers: list[Header]) -> None:
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not headers:
                raise ParseError("continuation line before the first header")
            prev = headers[-1]
            prev.raw += "\r\n" + line
            prev.value = (prev.value + " " + line.strip(_LWS)).strip(_LWS)
            continue
        if len(line) > MAX_LINE:
            raise MessageTooLarge("header line longer than %d" % MAX_LINE)
        name, colon, value = line.partition(":")
        if not colon:
            raise ParseError("header line without ':' %r" % line[:40])
        headers.append(Header(header_key(name.rstrip(_LWS)), name, value.strip(_LWS), line))


def _frame_body(msg: Message, body: bytes, stream: bool) -> bytes:
    """Apply Content-Length (§18.3, §20.14)."""
    values = [h.value for h in msg.headers if h.key == "content-length"]
    if not values:
        return b"" if stream else body
    if len(values) > 1 and len(set(values)) > 1:
        raise ParseError("conflicting Content-Length headers")
    length = parse_uint(values[0], "Content-Length", MAX_MESSAGE_SIZE)
    if len(body) < length:
        raise ParseError("body shorter than Content-Length (%d < %d)" % (len(body), length))
    return body[:length] if len(body) > length else body


_REQUIRED = ("via", "from", "to", "call-id", "cseq")


def _validate(msg: Message) -> None:
    """Checks every element makes before acting on a message (§8.2, §16.3)."""
    present = {h.key for h in msg.headers}
    missing = [k for k in _REQUIRED if k not in present]
    if missing:
        raise ParseError("missing %s" % ", ".join(missing))
    for key in ("from", "to", "call-id", "cseq", "max-forwards"):
        if sum(1 for h in msg.headers if h.key == key) > 1:
            raise ParseError("more than one %s header" % key)
    msg.via = msg.top_via()
    msg.cseq = cseq = CSeq.parse(msg.get("cseq") or "")
    call_id = msg.get("call-id") or ""
    if not call_id or any(c in call_id for c in " \t"):
        raise ParseError("malformed Call-ID")
    msg.from_addr = NameAddr.parse(msg.get("from") or "")
    msg.to_addr = NameAddr.parse(msg.get("to") or "")
    if isinstance(msg, Request):
        if cseq.method != msg.method:
            raise ParseError("CSeq method %r does not match %r" % (cseq.method, msg.method))
        mf = msg.get("max-forwards")
        if mf is not None:
            parse_uint(mf, "Max-Forwards", 255)


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
    headers = list(via) if via is not None else [h for h in request.headers if h.key == "via"]
    for h in request.headers:
        key = h.key
        if key == "to":
            if to_tag is not None and status != 100 and not _has_tag(h.value):
                tagged = ";tag=" + to_tag
                h = Header(key, h.name, h.value + tagged, h.raw + tagged)
            headers.append(h)
        elif key in ("from", "call-id", "cseq") or (key == "timestamp" and status == 100):
            headers.append(h)  # timestamp: §8.2.6.1
    if extra:
        headers.extend(extra)
    headers.append(Header("content-length", "Content-Length", str(len(body)),
                          "Content-Length: %d" % len(body)))
    return Response(headers=headers, body=body, status=status,
                    reason=reason or REASONS.get(status, "Unknown"))


def _has_tag(value: str) -> bool:
    if "tag" not in value.lower():
        return False
    try:
        return NameAddr.parse(value).tag is not None
    except SipError:
        return False
