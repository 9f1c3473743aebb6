"""Record-Route URIs that prove they are pcproxy's own (RFC 3261 §16.6 step 4, §16.4).

pcproxy forwards an in-dialog request only when it carries a Route that
pcproxy itself put in a Record-Route: anything else would make it an open
relay.  The user part of its Record-Route URI is a token,
``<side><flow>.<mac>``:

* ``side`` is ``o`` for the URI that faces the pool (the top one of the two
  pcproxy inserts, the first Route of the pool's in-dialog requests) and
  ``i`` for the URI that faces the client.  The first Route of an in-dialog
  request therefore says which way it travels.  Two URIs are inserted on
  every dialog-creating request, which also lets the two sides use different
  transports or listeners (the "double Record-Route" of RFC 5658 §3.2).
* ``flow`` (``i`` side only) names the connection or UDP source the
  dialog-creating request arrived on, base32 encoded, so a request from the
  pool goes back to the client over the same flow, as RFC 5626 §5.2-§5.3
  flow tokens do.
* ``mac`` is an HMAC-SHA-256 of side and flow under the daemon's secret,
  truncated to 80 bits: a Route naming pcproxy without a valid token was not
  made by pcproxy and is refused (403).

Tokens are made and checked many times for the same few flows (a Front End
keeps one connection), so both directions are remembered in bounded caches.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from proxy.sip.peer import Peer

#: Hex digits of the MAC kept in a token (80 bits).
MAC_LENGTH = 20
CACHE_SIZE = 4096
TOWARD_POOL = "i"
"""A request whose first Route is the client-facing URI came from the client."""
TOWARD_CLIENT = "o"
"""A request whose first Route is the pool-facing URI came from the pool."""


class RouteTokens:
    """Makes and checks Record-Route tokens under one secret."""

    __slots__ = ("_secret", "_made", "_checked")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._made: dict[tuple[str, Peer | None], str] = {}
        self._checked: dict[str, tuple[str, Peer | None]] = {}

    def make(self, side: str, flow: Peer | None = None) -> str:
        """The token for ``side`` (``o``/``i``) and, on the client side, its flow."""
        key = (side, flow)
        token = self._made.get(key)
        if token is None:
            text = side + (_encode(flow) if flow is not None else "")
            token = "%s.%s" % (text, self._mac(text))
            if len(self._made) >= CACHE_SIZE:
                self._made.clear()
            self._made[key] = token
        return token

    def check(self, user: str | None) -> tuple[str, Peer | None] | None:
        """``(side, flow)`` of a valid token, ``None`` for anything else."""
        if not user:
            return None
        known = self._checked.get(user)
        if known is not None:
            return known
        text, sep, mac = user.rpartition(".")
        if not sep or text[:1] not in (TOWARD_POOL, TOWARD_CLIENT):
            return None
        if not hmac.compare_digest(mac.encode("latin-1"), self._mac(text).encode("latin-1")):
            return None
        flow = _decode(text[1:]) if len(text) > 1 else None
        if len(text) > 1 and flow is None:
            return None
        result = (text[0], flow)
        if len(self._checked) >= CACHE_SIZE:
            self._checked.clear()
        self._checked[user] = result
        return result

    def _mac(self, text: str) -> str:
        digest = hmac.new(self._secret, text.encode("latin-1"), hashlib.sha256)
        return digest.hexdigest()[:MAC_LENGTH]


def _encode(flow: Peer) -> str:
    """A flow as base32 (lower case, no padding): characters a SIP URI user
    part takes unescaped (RFC 3261 §25.1 ``unreserved``)."""
    text = "%s %d %d %s %d" % (flow.transport, flow.listener, flow.conn, flow.host, flow.port)
    return base64.b32encode(text.encode("ascii")).decode("ascii").rstrip("=").lower()


def _decode(text: str) -> Peer | None:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        transport, listener, conn, host, port = base64.b32decode(padded).decode("ascii").split(" ")
        return Peer(transport, host, int(port), int(listener), int(conn))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
