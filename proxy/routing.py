"""The one decision: where does a request for this URI go?

A pure function of the endpoint snapshot, the Request-URI and the daemon's
default mode.  The Request-URI is what is matched (RFC 3261 §16.5: it names
the target; the To header is only the logical recipient and is never used):
``user@host`` with escapes decoded and case folded, port and parameters
ignored (see ``proxy.sip.uri``).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.sip.uri import SipUri
from proxy.store import Endpoint, Snapshot


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer 302 with ``contact`` (RFC 3261 §8.3, §21.3.3)."""

    endpoint: Endpoint
    contact: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Proxy the request to the endpoint's pool (RFC 3261 §16)."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class NotFound:
    """No endpoint has this URI: 404 (RFC 3261 §21.4.5)."""

    key: str


Decision = Redirect | Forward | NotFound


def decide(snapshot: Snapshot, uri: SipUri, default_mode: str, key: str | None = None) -> Decision:
    """Route a request whose Request-URI is ``uri`` (``key``: its ``aor_key``,
    when the caller has it at hand)."""
    if key is None:
        key = uri.aor_key
    endpoint = snapshot.lookup(key)
    if endpoint is None:
        return NotFound(key)
    if (endpoint.mode or default_mode) == "proxy":
        return Forward(endpoint)
    return Redirect(endpoint, pool_contact(uri, endpoint))


def pool_contact(uri: SipUri, endpoint: Endpoint) -> str:
    """The same user at the pool: ``<sip:ocschat@pcpool.contoso.com:5041;transport=tls>``."""
    hostport = endpoint.pool_fqdn
    if endpoint.pool_port is not None:
        hostport += ":%d" % endpoint.pool_port
    transport = ";transport=%s" % endpoint.pool_transport if endpoint.pool_transport else ""
    return "<%s:%s@%s%s>" % (uri.scheme, uri.user or "", hostport, transport)
