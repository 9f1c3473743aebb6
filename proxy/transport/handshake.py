"""Failed TLS handshakes on listeners: seen, counted, logged in one line.

Neither uvloop nor asyncio tells the application that a server-side handshake
failed.  Their SSL protocol treats the ``ssl.SSLError`` as an ``OSError``,
which it logs only when the loop runs in debug mode (it never reaches the
loop's exception handler), and it closes the accepted connection before the
application's protocol sees ``connection_made``.  The one object that sees
every handshake's outcome is the ``ssl.SSLObject`` the loop drives, and
``SSLContext.sslobject_class`` (Python 3.7+) lets a listener's context create a
subclass of it: its ``do_handshake`` reports a failure, then raises the same
error so that the loop closes the connection as before.

What is seen: a client without the required certificate, a certificate that
does not chain to the CA bundle, a client speaking plain TCP (or HTTP) to a
TLS port, a TLS version below ``tls.min_version``, and every alert a client
sends during the handshake (RFC 8446 §6).  A client that closes its socket
without an alert, or sends nothing until the handshake timeout, is not a
handshake error and is not counted.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

#: What ``do_handshake`` raises while it waits for more bytes: not a failure.
#: ``SSLSyscallError`` is retried by the loops' SSL protocols as well.
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError)

HandshakeFailed = Callable[[ssl.SSLError], object]


def observe_handshakes(context: ssl.SSLContext, failed: HandshakeFailed) -> None:
    """Make every connection accepted with ``context`` call ``failed(error)``
    when its handshake fails; the error still propagates to the loop."""

    class ObservedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except _AGAIN:
                raise
            except ssl.SSLError as exc:
                failed(exc)
                raise

    context.sslobject_class = ObservedSSLObject


def describe(exc: ssl.SSLError) -> dict[str, str]:
    """The fields of one log line: OpenSSL's reason code, and the certificate
    check's own message when that is what failed."""
    fields = {"reason": exc.reason or type(exc).__name__}
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        fields["detail"] = exc.verify_message
    return fields
