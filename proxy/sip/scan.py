"""What the fast paths share: reading everyday header lines over bytes.

The general parser (``proxy.sip.message``) decodes a whole message, names
every line and validates what every element needs (RFC 3261 §7, §8.2, §18.3).
The fast paths (``proxy.sip.redirect`` for the 302, ``proxy.sip.relay`` for
the INVITE a proxy forwards and the responses and requests of the dialog it
passes on) read only the lines they need, over the received bytes, and give
up (``None``) on anything the general parser would read differently or
refuse; the caller then takes the general path.  What they share lives
here: the split into header lines, the names of the lines they read, the
fields every message must have, the top Via's parameters, and the everyday
Via and name-addr patterns of ``proxy.sip.headers`` compiled over bytes.
"""

from __future__ import annotations

import re

from proxy.sip.headers import _NAME_ADDR_FAST, _VIA_FAST

#: RFC 3261 §25.1 token: a header name.
TOKEN = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+\Z")
#: Slots of the header fields the fast paths read; Via is 0, the ones the
#: redirect's response copies come first, the ones only a proxy reads last.
VIA, FROM, TO, CALL_ID, CSEQ, MAX_FORWARDS, LENGTH, REQUIRE, ROUTE, PROXY_REQUIRE = range(10)
RECORD_ROUTE, PROXY_AUTHORIZATION, TIMESTAMP = range(10, 13)
OTHER = -1
_KEYS = {
    b"via": VIA,
    b"v": VIA,
    b"from": FROM,
    b"f": FROM,
    b"to": TO,
    b"t": TO,
    b"call-id": CALL_ID,
    b"i": CALL_ID,
    b"cseq": CSEQ,
    b"max-forwards": MAX_FORWARDS,
    b"content-length": LENGTH,
    b"l": LENGTH,
    b"require": REQUIRE,
    b"route": ROUTE,
    b"proxy-require": PROXY_REQUIRE,
    b"record-route": RECORD_ROUTE,
    b"proxy-authorization": PROXY_AUTHORIZATION,
    b"timestamp": TIMESTAMP,
}
#: Header names as written -> their slot, or ``OTHER`` for any other valid
#: name; filled as names are met (bounded).  The scans look a name up here
#: first, and call ``slot_of`` only for one not met before.
NAMES: dict[bytes, int] = {
    **_KEYS,
    **{k.title(): v for k, v in _KEYS.items()},
    b"Call-ID": CALL_ID,
    b"CSeq": CSEQ,
}
NAMES_MAX = 4096
#: Longer names and values are read but not remembered, so the caches stay
#: small whatever a peer sends.
LONGEST = 256
LWS = b" \t"
#: RFC 3261 §20.16: a CSeq number is below 2**31.
CSEQ_LIMIT = 2**31
#: The largest Content-Length the general parser takes (``MAX_MESSAGE_SIZE``).
MAX_LENGTH = 65535
#: The header section the general parser reads without the long-line check
#: (``proxy.sip.message.MAX_LINE``).
MAX_BLOCK = 8192

#: The everyday Via and name-addr of ``proxy.sip.headers``, over bytes: the
#: same patterns (ASCII classes only), so whatever these match the general
#: parser reads the same way.
VIA_RE = re.compile(_VIA_FAST.pattern.encode())
NAME_ADDR_RE = re.compile(_NAME_ADDR_FAST.pattern.encode())
#: Name-addrs already found to be everyday with a simple SIP URI: the From
#: and To of a dialog come back in every message of it.
_everyday: set[bytes] = set()


def slot_of(name: bytes) -> int | None:
    """The slot of a header name as written that is not in ``NAMES`` yet,
    ``OTHER`` for another valid name, None for an invalid one (folding, a
    bad character); remembered in ``NAMES``."""
    stripped = name.rstrip(LWS)
    if not TOKEN.match(stripped):
        return None
    key = _KEYS.get(stripped.lower(), OTHER)
    if len(NAMES) < NAMES_MAX and len(name) <= LONGEST:
        NAMES[name] = key
    return key


def header_lines(data: bytes, head: int, max_headers: int) -> tuple[list[bytes], int] | None:
    """The header lines of ``data`` from offset ``head`` (just past the start
    line) and the offset of the CRLF CRLF that ends them; None when a line
    would need the general parser: no empty line, more than ``max_headers``
    lines, a header section over ``MAX_BLOCK``, a CR or LF that is not a line
    end, or folding (§7.3.1: a continuation line has no colon of its own
    before its first space, and is caught by ``slot_of``)."""
    end = data.find(b"\r\n\r\n", head - 2)
    if end < head:
        return None
    lines = data[head:end].split(b"\r\n")
    n = len(lines)
    if (
        n > max_headers
        or end - head > MAX_BLOCK
        or data.count(b"\n", head, end) != n - 1
        or data.count(b"\r", head, end) != n - 1
    ):
        return None
    return lines, end


def header_section(
    data: bytes, start_line: re.Pattern[bytes], max_size: int, max_headers: int
) -> tuple[re.Match[bytes], list[bytes], int] | None:
    """The start line of ``data`` as ``start_line`` matches it (CRLF
    included), its header lines and the offset of the CRLF CRLF that ends
    them (``header_lines``); None for a message over ``max_size``, another
    start line or header lines the general parser must read."""
    if len(data) > max_size:
        return None
    start = start_line.match(data)
    if start is None:
        return None
    split = header_lines(data, start.end(), max_headers)
    if split is None:
        return None
    return start, split[0], split[1]


#: What ``everyday_fields`` gives: the top Via, From, To and Call-ID values,
#: and the CSeq's number and method.
Fields = tuple[bytes, bytes, bytes, bytes, bytes, bytes]


def everyday_fields(slots: list[bytes | None], body: int) -> Fields | None:
    """The top Via, From, To, Call-ID and CSeq values a scan put in
    ``slots`` (eight, indexed by ``VIA``...``REQUIRE``), when each is there, the
    Content-Length is there and the ``body`` bytes after the header section
    fill it exactly (§18.3: neither short, which the general parser refuses,
    nor long, which it cuts), the Call-ID has no blank (``call_id_ok``) and
    the CSeq is a number and a token (``cseq_of``); None otherwise."""
    via, from_v, to_v, call_id, cseq, _, length, _ = slots
    if (
        via is None
        or from_v is None
        or to_v is None
        or call_id is None
        or cseq is None
        or length is None
        or not length_ok(length, body, exact=True)
        or not call_id_ok(call_id)
    ):
        return None
    number_method = cseq_of(cseq)
    if number_method is None:
        return None
    return via, from_v, to_v, call_id, number_method[0], number_method[1]


def everyday_via(value: bytes) -> re.Match[bytes] | None:
    """The first value of a Via line (up to a comma) matched by ``VIA_RE``
    with its port in range, as ``Via.parse`` reads it without its general
    path; None otherwise.  The everyday Via holds no quote and no angle
    bracket, so its first comma is the one that ends it (§7.3.1)."""
    comma = value.find(b",")
    via = VIA_RE.match((value if comma < 0 else value[:comma]).strip(LWS))
    if via is None:
        return None
    port = via.group(3)
    if port and not 0 < int(port) < 65536:
        return None
    return via


def branch_of(paramtext: bytes) -> bytes | None:
    """The first ``branch`` parameter of an everyday Via's parameters
    (``;name=value...``, as ``VIA_RE`` matched them), as ``Via.branch``
    reads it: b"" for one without a value, None for none."""
    for item in paramtext[1:].split(b";"):
        name, eq, value = item.partition(b"=")
        if name.lower() == b"branch":
            return value if eq else b""
    return None


def via_params(paramtext: bytes) -> tuple[bytes | None, bytes | None, bool] | None:
    """The first ``branch`` and ``rport`` of an everyday Via's parameters
    (``;name=value...``, as ``VIA_RE`` matched them), b"" for one without a
    value, None for none, and whether it has ``received``; None for a Via
    with ``maddr``, whose responses go elsewhere (§18.2.2): the general
    path's."""
    branch = rport = None
    received = False
    for item in paramtext[1:].split(b";"):
        name, eq, value = item.partition(b"=")
        name = name.lower()
        if name == b"branch":
            if branch is None:
                branch = value if eq else b""
        elif name == b"rport":
            if rport is None:
                rport = value if eq else b""
        elif name == b"received":
            received = True
        elif name == b"maddr":
            return None
    return branch, rport, received


def has_tag(paramtext: bytes | None) -> bool:
    """Whether a name-addr's parameters (as ``NAME_ADDR_RE`` matched them)
    hold a ``tag`` (§19.3), with a value or without, as ``NameAddr.tag``
    reads them."""
    if not paramtext:
        return False
    return any(p.partition(b"=")[0].lower() == b"tag" for p in paramtext[1:].split(b";"))


def everyday_name_addr(value: bytes) -> bool:
    """Whether a From or To value (stripped) is an everyday name-addr with a
    simple SIP URI, which ``NameAddr.parse`` reads without error."""
    if value in _everyday:
        return True
    addr = NAME_ADDR_RE.match(value)
    if addr is None or addr.group(3) is None:
        return False
    if len(_everyday) >= NAMES_MAX:
        _everyday.clear()
    if len(value) <= LONGEST:
        _everyday.add(value)
    return True


def cseq_of(value: bytes) -> tuple[bytes, bytes] | None:
    """The number and method of a CSeq value that ``CSeq.parse`` accepts
    (§20.16), or None: let the general parser decide."""
    parts = value.split()
    if len(parts) != 2:
        return None
    number, method = parts
    if not number.isdigit() or len(number) > 10 or int(number) >= CSEQ_LIMIT:
        return None
    if method not in _METHODS and not TOKEN.match(method):
        return None
    return number, method


#: The methods of the CSeqs the scans meet, known to be tokens.
_METHODS = frozenset((b"INVITE", b"ACK", b"BYE", b"CANCEL", b"SUBSCRIBE", b"INFO", b"UPDATE"))


def call_id_ok(value: bytes) -> bool:
    """A Call-ID the general parser accepts: not empty, no blank inside."""
    value = value.strip(LWS)
    return bool(value) and b" " not in value and b"\t" not in value


def length_ok(value: bytes, body: int, exact: bool) -> bool:
    """A Content-Length (§20.14) the body fills: ``body`` bytes follow the
    header section; ``exact`` asks for no byte past it either."""
    value = value.strip(LWS)
    if not value.isdigit() or len(value) > 5:
        return False
    n = int(value)
    if n > MAX_LENGTH:
        return False
    return n == body if exact else n <= body
