"""The redirect builder's fast path: one scan of an everyday request.

Theory of operation
-------------------
Nearly every message a redirect server sees has the same shape: an INVITE or
a SUBSCRIBE from a legacy client for the well-known chat URI, one Via, no
folding, no dialog.  ``scan`` reads such a request with a few regular
expressions over its bytes and returns just what the 302 needs
(``Scanned``); ``build_302`` writes that response.  The two together
replace, for this one case, the general parser (``proxy.sip.message``), the
UAS checks of RFC 3261 §8.2 and ``make_response`` (§8.2.6), and must give the
very same bytes.

``scan`` is conservative: it returns ``None`` for anything it is not sure
of, and the caller takes the general path, which answers it exactly as
before (a 400, a 420, a 483, a retransmission...).  What it accepts is what
the general parser accepts without error *and* what needs no answer but a
302 or a 404 from the table:

* the request line ``INVITE|SUBSCRIBE sip:... SIP/2.0`` (§7.1, §25.1), no
  leading CRLF (§7.5);
* header lines of a token, a colon and a value, each ending in CRLF: no
  folding, no bare CR or LF (§7.3.1), at most ``max_headers`` of them;
* exactly one each of From, To, Call-ID, CSeq, at most one Max-Forwards and
  Content-Length, at least one Via (§8.1.1, §20), and no Require (§8.2.2.3:
  pcproxy supports no extension, so any Require needs a 420);
* a top Via of one value in the everyday form, with an RFC 3261 branch
  (§17.2.3) and no ``maddr`` (§18.2.2);
* From and To name-addrs of the everyday form with a simple SIP URI, the To
  without a tag (no dialog, §12.2.2);
* a CSeq whose method is the request's (§8.1.1.5), a Max-Forwards above 0
  (§16.3 step 3 would answer 483), a Content-Length the body fills (§18.3).

``tests/unit/test_redirect_fast.py`` holds the proof: for generated requests
and for the RFC 4475/5118 corpus, an element with the fast path sends the
same bytes as one without it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.sip.scan import (
    CSEQ_LIMIT,
    LONGEST,
    LWS,
    MAX_FORWARDS,
    MAX_LENGTH,
    NAME_ADDR_RE,
    NAMES,
    NAMES_MAX,
    REQUIRE,
    TO,
    VIA,
    everyday_via,
    has_tag,
    header_section,
    slot_of,
    via_params,
)

#: RFC 3261 §7.1, the two methods a legacy client sends to the chat URI.
_REQUEST_LINE = re.compile(rb"(INVITE|SUBSCRIBE) (sip:[^ \r\n]+) SIP/2\.0\r\n")
#: To values already found to be everyday name-addrs without a tag: the To
#: of every request for the chat URI is the same.
_plain_to: set[bytes] = set()
#: Max-Forwards values above 0, as written (§8.1.1.6: 70 is the default).
_HOPS = frozenset(str(n).encode() for n in range(1, 256))


class Scanned(NamedTuple):
    """What the 302 to an everyday request needs of it."""

    method: str
    uri: bytes
    branch: str
    #: The top Via's sent-by, lower case: with ``branch`` and ``method``, the
    #: server transaction's key (§17.2.3).
    sent_by: str
    via_host: str
    via_port: int | None
    #: None: no ``rport``; "": asked for (RFC 3581 §4); else its value.
    rport: str | None
    received: bool
    #: The raw Via lines, top first, and the raw From, To, Call-ID and CSeq
    #: lines in the order they came (Via lines included, in place).
    vias: list[bytes]
    copied: list[bytes]
    to_index: int


def scan(data: bytes, max_size: int, max_headers: int) -> Scanned | None:
    """Read an everyday INVITE or SUBSCRIBE, or say ``None``: take the
    general path (see the module's docstring for what is everyday).

    Written for speed (it runs once per call): one pass over the header
    lines that only slices the name of a line it does not need."""
    section = header_section(data, _REQUEST_LINE, max_size, max_headers)
    if section is None:
        return None
    start, lines, end = section
    vias: list[bytes] = []
    copied: list[bytes] = []
    slots: list[bytes | None] = [None, None, None, None, None, None, None, None]
    to_index = -1
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
        if key < 0 or key > REQUIRE:
            continue  # Route and Proxy-Require mean nothing to a redirect server
        if key == VIA:
            if not vias:
                slots[VIA] = raw[colon + 1 :]
            vias.append(raw)
            copied.append(raw)
            continue
        if slots[key] is not None or key == REQUIRE:
            return None  # a second one (§7.3.1: the general path decides), or Require
        slots[key] = raw[colon + 1 :]
        if key < MAX_FORWARDS:
            if key == TO:
                to_index = len(copied)
            copied.append(raw)
    top_via, from_v, to_v, call_id, cseq, max_fwd, length, _ = slots
    if top_via is None or from_v is None or to_v is None or call_id is None or cseq is None:
        return None
    if max_fwd is not None and max_fwd.strip(LWS) not in _HOPS:
        return None
    # the checks of scan.length_ok, call_id_ok and cseq_of, written out: this
    # runs once per redirected call, and the three calls cost it about 2 us
    # (bench/README.md, "Latest runs")
    if length is not None:
        length = length.strip(LWS)
        if (
            not length.isdigit()
            or len(length) > 5
            or int(length) > min(MAX_LENGTH, len(data) - end - 4)
        ):
            return None
    call_id = call_id.strip(LWS)
    if not call_id or b" " in call_id or b"\t" in call_id:
        return None
    method = start.group(1)
    number, _, cseq_method = cseq.strip(LWS).partition(b" ")
    if (
        cseq_method != method
        or not number.isdigit()
        or len(number) > 10
        or int(number) >= CSEQ_LIMIT
    ):
        return None
    # the top Via: one value, the everyday form, an RFC 3261 branch
    if b"," in top_via:
        return None
    via = everyday_via(top_via)
    if via is None:
        return None
    _, host, port, paramtext = via.groups()
    params = via_params(paramtext)
    if params is None:
        return None  # maddr
    branch, rport, received = params
    if branch is None or not branch.startswith(b"z9hG4bK"):
        return None
    # From and To: everyday name-addrs with simple SIP URIs, To without a tag
    addr = NAME_ADDR_RE.match(from_v.strip(LWS))
    if addr is None or addr.group(3) is None:
        return None
    to_v = to_v.strip(LWS)
    if to_v not in _plain_to:
        addr = NAME_ADDR_RE.match(to_v)
        if addr is None or addr.group(3) is None:
            return None
        if addr.group(5):
            if has_tag(addr.group(5)):
                return None
        elif len(_plain_to) < NAMES_MAX and len(to_v) <= LONGEST:
            _plain_to.add(to_v)
    host_text = host.decode()
    return Scanned(
        method.decode(),
        start.group(2),
        branch.decode("latin-1"),
        host_text.lower() if port is None else "%s:%d" % (host_text.lower(), int(port)),
        host_text,
        int(port) if port else None,
        None if rport is None else rport.decode("latin-1"),
        received,
        vias,
        copied,
        to_index,
    )


def build_final(
    scanned: Scanned,
    status_line: bytes,
    extra: bytes,
    to_tag: str | None,
    source_host: str,
    source_port: int,
) -> bytes:
    """The final response to ``scanned`` (RFC 3261 §8.2.6): the status line,
    the Via lines (the top one with ``received`` and ``rport`` filled in,
    §18.2.1, RFC 3581 §4), From, To with ``to_tag``, Call-ID and CSeq as
    they came, ``extra`` (whole lines, each ending in CRLF) and
    ``Content-Length: 0``.  A 100 Trying (``to_tag`` None) keeps the To
    as it came (§8.2.6.2).

    The line order is ``make_response``'s: the Via lines in place when none
    changes, else first.
    """
    copied = scanned.copied
    if to_tag is not None:
        copied = list(copied)
        i = scanned.to_index
        copied[i] = copied[i] + b";tag=" + to_tag.encode()
    rport = scanned.rport
    if rport != "" and scanned.via_host.strip("[]") == source_host:
        lines = copied
    else:
        vias = list(scanned.vias)
        top = vias[0]
        name, _, value = top.partition(b":")
        value = value.strip(b" \t")
        if rport == "":
            value = _fill_rport(value, source_port)
        if not scanned.received:
            value += b";received=" + source_host.encode()
        vias[0] = name + b": " + value
        lines = vias + [line for line in copied if line not in scanned.vias]
    return b"%s%s\r\n%sContent-Length: 0\r\n\r\n" % (status_line, b"\r\n".join(lines), extra)


def _fill_rport(value: bytes, port: int) -> bytes:
    head, sep, params = value.partition(b";")
    out = [b"rport=%d" % port if p.strip().lower() == b"rport" else p for p in params.split(b";")]
    return head + sep + b";".join(out)
