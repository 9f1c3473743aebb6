"""Framing SIP messages out of a byte stream (TCP, TLS).

RFC 3261 §18.3: on a stream the Content-Length header says where the body
ends, and it is mandatory there; §7.5: CRLFs before a start line are ignored.
RFC 5626 §4.4.1 (and §3.5.1): a client keeps a flow alive by sending a
double CRLF ("ping"), to which the server answers a single CRLF ("pong").

The framer only splits bytes; it does not parse beyond the header names it
needs.  Everything it keeps is bounded: a header section that does not end
within ``max_message`` bytes, or a declared body that would take the message
past it, is a ``MessageTooLarge`` after which the connection must be closed
(the stream cannot be resynchronised).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.sip.errors import MessageTooLarge, ParseError

_CONTENT_LENGTH = re.compile(
    rb"\r\n(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)", re.I
)


@dataclass(frozen=True, slots=True)
class MessageFramed:
    """A complete message's bytes, ready for ``message.parse(stream=True)``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlivePing:
    """A double CRLF between messages: answer with one CRLF (RFC 5626 §4.4.1)."""


FramerEvent = MessageFramed | KeepAlivePing


class StreamFramer:
    """Accumulates stream bytes and yields whole messages and keep-alives."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_message: int = 65535) -> None:
        self._buf = bytearray()
        self._max = max_message

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[FramerEvent]:
        """Add received bytes; return every event now complete.

        Raises ``MessageTooLarge`` or ``ParseError`` when the stream is beyond
        repair; the caller then closes the connection.
        """
        buf = self._buf
        buf += data
        events: list[FramerEvent] = []
        while buf:
            if buf[0] in (13, 10):
                if buf.startswith(b"\r\n\r\n"):
                    del buf[:4]
                    events.append(KeepAlivePing())
                    continue
                if buf == b"\r\n" or buf == b"\r" or buf == b"\r\n\r":
                    break  # may be the start of a ping: wait for more
                del buf[: 2 if buf.startswith(b"\r\n") else 1]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max:
                    raise MessageTooLarge("header section exceeds %d bytes" % self._max)
                break
            head_end = end + 4
            length = 0
            for m in _CONTENT_LENGTH.finditer(buf, 0, end + 2):
                value = m.group(1)
                if not value.isdigit():
                    # the end of this message, hence the start of the next, is unknown
                    raise ParseError("malformed Content-Length %r" % bytes(value[:20]))
                length = int(value[-10:]) if len(value.lstrip(b"0")) <= 9 else self._max + 1
                break
            total = head_end + length
            if total > self._max:
                raise MessageTooLarge("message of %d bytes exceeds %d" % (total, self._max))
            if len(buf) < total:
                break
            events.append(MessageFramed(bytes(buf[:total])))
            del buf[:total]
        return events
