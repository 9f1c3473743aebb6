"""Header field values: names, lists, parameters, Via, name-addr, CSeq.

RFC 3261 §7.3 (header field format, folding, comma-separated lists), §7.3.3
(compact forms), §20 (the fields), §25.1 (ABNF).  Values arrive as ``str``
decoded from Latin-1, so every byte maps to one character and serialising
gives the same bytes back; nothing here re-encodes what it does not change.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.sip.errors import ParseError, UriError
from proxy.sip.uri import SIP_URI_SIMPLE, check_uri, parse_uri, scheme_of

#: RFC 3261 §7.3.3 plus the registered compact forms that SIP elements meet.
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_LWS = " \t"

#: Canonical key of a header name: lower case, compact forms expanded.
_key_cache: dict[str, str] = {}


def header_key(name: str) -> str:
    """The comparison key of a header name (§7.3.1: names are case-insensitive)."""
    key = _key_cache.get(name)
    if key is None:
        if not _TOKEN.match(name):
            raise ParseError("malformed header name %r" % name[:40])
        lower = name.lower()
        key = COMPACT_FORMS.get(lower, lower)
        if len(_key_cache) < 4096:
            _key_cache[name] = key
    return key


def is_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


def split_commas(value: str) -> list[str]:
    """Split a comma-separated header value (§7.3.1), honouring quoted strings
    and ``<...>`` (a URI may hold commas inside angle brackets)."""
    if "," not in value:
        return [value.strip(_LWS)]
    return [part.strip(_LWS) for part in _split_outside_quotes(value, ",", angle=True)]


def _split_outside_quotes(text: str, sep: str, *, angle: bool) -> list[str]:
    """Split ``text`` at ``sep`` except inside quoted strings (with their
    quoted-pairs, §25.1) and, when ``angle``, inside ``<...>``."""
    parts: list[str] = []
    start = 0
    for i in separator_offsets(text, sep, angle=angle):
        parts.append(text[start:i])
        start = i + 1
    parts.append(text[start:])
    return parts


def separator_offsets(text: str, sep: str, *, angle: bool, start: int = 0) -> list[int]:
    """Offsets of ``sep`` in ``text`` from ``start``, outside quoted strings
    and, when ``angle``, outside ``<...>`` (§7.3.1, §25.1); raises
    ``ParseError`` for an unterminated quoted string.

    One regular-expression scan: quoted strings (with their quoted-pairs)
    and bracketed URIs are matched whole and skipped, so only separators
    outside them are reported.
    """
    if '"' not in text and not (angle and "<" in text):
        offsets = []
        at = text.find(sep, start)
        while at >= 0:
            offsets.append(at)
            at = text.find(sep, at + 1)
        return offsets
    scanner = _SCANNERS.get((sep, angle))
    if scanner is None:
        scanner = _SCANNERS[(sep, angle)] = re.compile(
            r'"(?:[^"\\]|\\.)*"%s|(%s)|(")' % (r"|<[^>]*>?" if angle else "", re.escape(sep)),
            re.S,
        )
    offsets = []
    for m in scanner.finditer(text, start):
        if m.group(1) is not None:
            offsets.append(m.start())
        elif m.group(2) is not None:
            raise ParseError("unbalanced quotes in %r" % text[:80])
    return offsets


_SCANNERS: dict[tuple[str, bool], re.Pattern[str]] = {}


def parse_params(text: str) -> list[tuple[str, str | None]]:
    """``;name=value;flag`` -> [(name, value), (flag, None)] (§25.1 generic-param).

    Names are lower-cased; a value may be a token, a host or a quoted string.
    """
    params: list[tuple[str, str | None]] = []
    if not text:
        return params
    if '"' in text:
        items = _split_outside_quotes(text, ";", angle=False)
    else:
        items = text.split(";")
    for item in items[1:] if items and not items[0].strip(_LWS) else items:
        name, eq, value = item.partition("=")
        name = name.strip(_LWS)
        if not name or not _TOKEN.match(name):
            raise ParseError("malformed parameter %r" % item[:80])
        if eq:
            value = value.strip(_LWS)
            if not value:
                raise ParseError("empty value for parameter %r" % name)
            if value[0] == '"':
                _check_quoted(value)
            params.append((name.lower(), value))
        else:
            params.append((name.lower(), None))
    return params


def _check_quoted(text: str) -> int:
    """Validate a quoted-string at the start of ``text``; return its end index."""
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    raise ParseError("unterminated quoted string")


def param_value(params: list[tuple[str, str | None]], name: str) -> str | None:
    for pname, value in params:
        if pname == name:
            return "" if value is None else value
    return None


_T = r"[A-Za-z0-9\-.!%*_+`'~]+"
#: The everyday Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK...;rport
_VIA_FAST = re.compile(
    r"SIP/2\.0/([A-Za-z]+) ((?:[0-9]{1,3}\.){3}[0-9]{1,3}|(?:[A-Za-z0-9](?:[A-Za-z0-9-]*"
    r"[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?::([0-9]{1,5}))?"
    r"((?:;%s(?:=%s)?)*)\Z" % (_T, _T)
)


#: RFC 3261 §8.1.1.7: branches that start with the magic cookie are unique.
MAGIC_COOKIE = "z9hG4bK"


class Via(NamedTuple):
    """One Via value: ``SIP/2.0/UDP host:port;branch=...`` (RFC 3261 §20.42).

    Parsed values are immutable records; a NamedTuple builds in half the
    time of a frozen dataclass, and every request has a Via, a From and a To.
    """

    transport: str
    host: str
    port: int | None
    params: list[tuple[str, str | None]]

    @classmethod
    def parse(cls, value: str) -> Via:
        m = _VIA_FAST.match(value)
        if m is not None and not (m.group(3) and not 0 < int(m.group(3)) < 65536):
            transport, host, port, paramtext = m.groups()
            params: list[tuple[str, str | None]] = []
            for item in paramtext[1:].split(";") if paramtext else ():
                name, eq, pvalue = item.partition("=")
                params.append((name.lower(), pvalue if eq else None))
            return cls(transport.upper(), host, int(port) if port else None, params)
        return cls._parse_general(value)

    @classmethod
    def _parse_general(cls, value: str) -> Via:
        proto, sep, rest = value.partition("/")
        version, sep2, rest = rest.partition("/")
        if not sep or not sep2:
            raise ParseError("malformed Via %r" % value[:80])
        proto, version = proto.strip(_LWS), version.strip(_LWS)
        if proto.upper() != "SIP" or not _TOKEN.match(version):
            raise ParseError("malformed Via protocol %r" % value[:80])
        rest = rest.lstrip(_LWS)
        i = 0
        while i < len(rest) and rest[i] not in _LWS:
            i += 1
        transport = rest[:i]
        if not transport or not _TOKEN.match(transport):
            raise ParseError("malformed Via transport %r" % value[:80])
        sentby, semi, paramtext = rest[i:].lstrip(_LWS).partition(";")
        sentby = sentby.strip(_LWS)
        host, port = _parse_sent_by(sentby)
        params = parse_params(paramtext) if semi else []
        return cls(transport.upper(), host, port, params)

    @property
    def branch(self) -> str | None:
        return param_value(self.params, "branch")

    def param(self, name: str) -> str | None:
        return param_value(self.params, name)

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else "%s:%d" % (self.host, self.port)


def _parse_sent_by(sentby: str) -> tuple[str, int | None]:
    if not sentby:
        raise ParseError("Via without sent-by")
    if sentby.startswith("["):
        end = sentby.find("]")
        if end < 0:
            raise ParseError("malformed IPv6 reference in Via")
        host, rest = sentby[: end + 1], sentby[end + 1 :].strip(_LWS)
        portstr = rest[1:].strip(_LWS) if rest.startswith(":") else None
        if rest and portstr is None:
            raise ParseError("malformed Via sent-by %r" % sentby[:80])
    else:
        host, colon, p = sentby.partition(":")
        host = host.strip(_LWS)
        portstr = p.strip(_LWS) if colon else None
    try:
        parse_uri("sip:" + host)
    except UriError:
        raise ParseError("malformed Via host %r" % host[:80]) from None
    port = None
    if portstr is not None:
        if not portstr.isdigit() or not portstr.isascii() or len(portstr) > 5:
            raise ParseError("malformed Via port %r" % portstr[:10])
        port = int(portstr)
        if not 0 < port < 65536:
            raise ParseError("Via port out of range")
    return host, port


#: The everyday name-addr: "Display" <sip:user@host>;tag=abc;epid=123
#: (the URI is validated by the same match when it is a simple SIP URI)
_NAME_ADDR_FAST = re.compile(
    r'(?:"((?:[^"\\\r\n]++|\\[^\r\n])*+)"[ \t]*|(%s(?:[ \t]+%s)*)[ \t]*)?'
    r'<(?:(%s)|([^<>"\s]+))>((?:;%s(?:=%s)?)*)\Z' % (_T, _T, SIP_URI_SIMPLE, _T, _T)
)


#: Parsed values that recur, keyed by the value as written: name-addrs (the
#: To of every request for the chat URI; the From and To of every message of
#: a dialog, which a proxy reads again for each request and response) and
#: CSeq.  Bounded: emptied when full.  Parsed values are never changed.
_recurring: dict[str, NameAddr | CSeq] = {}
_RECURRING_MAX = 8192


#: Longer values are not remembered: the cache stays small (8192 values of
#: at most this many characters) whatever a peer sends.
_RECURRING_LONGEST = 256


def _remember(value: str, parsed: NameAddr | CSeq) -> None:
    if len(value) > _RECURRING_LONGEST:
        return
    if len(_recurring) >= _RECURRING_MAX:
        _recurring.clear()
    _recurring[value] = parsed


class NameAddr(NamedTuple):
    """From, To, Contact, Route values: ``"Name" <uri>;tag=x`` (§20.10, §25.1)."""

    display: str | None
    uri: str
    params: list[tuple[str, str | None]]
    bracketed: bool

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        known = _recurring.get(value)
        if type(known) is NameAddr:
            return known
        m = _NAME_ADDR_FAST.match(value)
        if m is not None:
            quoted, tokens, simple, uri, paramtext = m.groups()
            if simple is not None:
                uri = simple
            else:
                _check_uri(uri)
            params: list[tuple[str, str | None]] = []
            for item in paramtext[1:].split(";") if paramtext else ():
                name, eq, pvalue = item.partition("=")
                params.append((name.lower(), pvalue if eq else None))
            display = '"%s"' % quoted if quoted is not None else (tokens or None)
            addr = cls(display, uri, params, True)
            _remember(value, addr)
            return addr
        return cls._parse_general(value)

    @classmethod
    def _parse_general(cls, value: str) -> NameAddr:
        value = value.strip(_LWS)
        display: str | None = None
        if value.startswith('"'):
            end = _check_quoted(value)
            display = value[:end]
            rest = value[end:].lstrip(_LWS)
            if not rest.startswith("<"):
                raise ParseError("quoted display name without <addr-spec>")
        else:
            lt = value.find("<")
            if lt >= 0:
                display = value[:lt].strip(_LWS) or None
                if display is not None:
                    for word in display.split():
                        if not _TOKEN.match(word):
                            raise ParseError("display name %r must be quoted" % display[:40])
                rest = value[lt:]
            else:
                rest = value
        if rest.startswith("<"):
            gt = rest.find(">")
            if gt < 0:
                raise ParseError("missing '>' in %r" % value[:80])
            uri = rest[1:gt].strip(_LWS)
            tail = rest[gt + 1 :].strip(_LWS)
            if tail and not tail.startswith(";"):
                raise ParseError("garbage after '>' in %r" % value[:80])
            bracketed = True
        else:
            # addr-spec without brackets: parameters belong to the header (§20.10)
            uri, semi, tail = rest.partition(";")
            uri = uri.strip(_LWS)
            tail = semi + tail
            if any(c in uri for c in " \t,?"):
                raise ParseError("URI with special characters must be in <> in %r" % value[:80])
            bracketed = False
        _check_uri(uri)
        return cls(display, uri, parse_params(tail) if tail else [], bracketed)

    @property
    def tag(self) -> str | None:
        return param_value(self.params, "tag")


def _check_uri(uri: str) -> None:
    """Any absoluteURI may stand in From/To; SIP ones must parse (§19.1)."""
    scheme = scheme_of(uri)
    if not scheme:
        raise ParseError("malformed URI %r" % uri[:80])
    if scheme in ("sip", "sips"):
        try:
            check_uri(uri)
        except UriError as exc:
            raise ParseError("malformed URI: %s" % exc.reason) from None
    elif any(c in uri for c in ' \t<>"'):
        raise ParseError("malformed URI %r" % uri[:80])


class CSeq(NamedTuple):
    """``CSeq: 4711 INVITE`` (RFC 3261 §20.16: a 32-bit number, below 2**31)."""

    number: int
    method: str

    @classmethod
    def parse(cls, value: str) -> CSeq:
        known = _recurring.get(value)
        if type(known) is CSeq:
            return known
        parts = value.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
            raise ParseError("malformed CSeq %r" % value[:40])
        number, method = parts
        if len(number) > 10 or (n := int(number)) >= 2**31:
            raise ParseError("CSeq number out of range")
        if method not in _METHODS and not _TOKEN.match(method):
            raise ParseError("malformed CSeq method")
        cseq = cls(n, method)
        _remember(value, cseq)
        return cseq


#: Methods every SIP element meets (RFC 3261 §27.4 and extensions): tokens
#: known in advance, so they need no regular expression.
_METHODS = frozenset(
    ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "SUBSCRIBE", "NOTIFY")
    + ("INFO", "UPDATE", "MESSAGE", "REFER", "PRACK", "PUBLISH", "SERVICE", "BENOTIFY")
)


#: Decimal texts of 0..255 and their values, looked up before any parsing:
#: every Max-Forwards (70 is the §8.1.1.6 default) and the Content-Length 0 of
#: ACK, BYE, CANCEL and most requests without a body are among them.
_SMALL_UINTS = {str(n): n for n in range(256)}


def parse_uint(value: str, what: str, limit: int) -> int:
    """A decimal field such as Max-Forwards or Expires, bounded by ``limit``."""
    n = _SMALL_UINTS.get(value)
    if n is not None and n <= limit:
        return n
    value = value.strip(_LWS)
    if not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) > limit:
        raise ParseError("%s: %r is not a number up to %d" % (what, value[:20], limit))
    return int(value)


def option_tags(values: list[str]) -> list[str]:
    """Option tags of Require/Proxy-Require/Supported/Unsupported (§20.32)."""
    tags: list[str] = []
    for value in values:
        for tag in value.split(","):
            tag = tag.strip(_LWS)
            if tag:
                if not _TOKEN.match(tag):
                    raise ParseError("malformed option tag %r" % tag[:40])
                tags.append(tag)
    return tags
