"""One error root for everything the SIP core rejects.

Like h11's ``ProtocolError``, every error carries the SIP status it suggests
(RFC 3261 §21) so that only the transport edge turns it into a response, a log
line or a metric.  A bare ``ValueError`` never leaves ``proxy.sip``.
"""

from __future__ import annotations


class SipError(Exception):
    """Root of the errors raised by the SIP core.

    ``status`` is the response the receiving element should answer with when a
    response can be routed (RFC 3261 §8.2, §16.3); ``reason`` is a short
    human-readable phrase naming what was wrong.
    """

    status: int = 400

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class ParseError(SipError):
    """The bytes are not a well-formed SIP message (RFC 3261 §25): 400."""

    status = 400


class MessageTooLarge(SipError):
    """A message, header section or stream buffer exceeded its bound: 513.

    RFC 3261 §21.5.14 ("Message Too Large"); for UDP the caller may answer 513
    only if the request line and Via could be read.
    """

    status = 513


class UriError(SipError):
    """A URI is malformed (400) or has a scheme we do not serve (416, §21.4.15)."""

    status = 400


class VersionNotSupported(SipError):
    """SIP-Version other than SIP/2.0: 505 (RFC 3261 §21.5.6)."""

    status = 505
