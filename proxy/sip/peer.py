"""Where a message came from and where one goes: the core's view of a transport.

The pure core never sees a socket.  A ``Peer`` names the far end (transport,
address, port) and, for the transport layer's benefit, which listener a
datagram arrived on and which stream connection a message belongs to, so a
response can leave by the same socket or connection (RFC 3261 §18.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Peer:
    transport: str
    host: str
    port: int
    listener: int = 0
    conn: int = 0
    #: The name a TLS server's certificate must carry (RFC 5922 §4: the
    #: domain of the URI that was resolved); empty for other transports.
    name: str = ""

    @property
    def reliable(self) -> bool:
        """TCP and TLS: no retransmissions, Timers I/J/K are zero (§17)."""
        return self.transport != "udp"


@dataclass(frozen=True, slots=True)
class Send:
    """Action: put ``data`` on the wire towards ``peer``."""

    data: bytes
    peer: Peer
