"""The only place that touches sockets: UDP and TCP listeners, stream framing
buffers and the connection table (RFC 3261 §18).

Every received datagram or framed stream message is handed to one callback
as ``(data, Peer)``; ``Transports.send`` puts the core's ``Send`` actions on
the wire: UDP from the listener the request came in on, TCP on the
connection the request came in on (§18.2.2).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import structlog

from proxy.config import ListenAddress
from proxy.sip.errors import SipError
from proxy.sip.framing import KeepAlivePing, StreamFramer
from proxy.sip.peer import Peer, Send

Deliver = Callable[[bytes, Peer], None]

UDP_BUFFER = 4 * 1024 * 1024
log = structlog.get_logger("transport")


#: Source addresses whose ``Peer`` a UDP listener keeps: a busy Front End
#: sends from a few, and building a Peer per datagram was measurable.
PEER_CACHE = 1024


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, index: int, deliver: Deliver) -> None:
        self.index = index
        self.deliver = deliver
        self.transport: asyncio.DatagramTransport | None = None
        self._peers: dict[tuple[Any, ...], Peer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, UDP_BUFFER)
                except OSError:
                    pass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) >= PEER_CACHE:
                self._peers.clear()
            peer = self._peers[addr] = Peer("udp", addr[0], addr[1], self.index)
        self.deliver(data, peer)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp_error", error=str(exc))


class StreamConnection(asyncio.Protocol):
    """One accepted TCP connection: frames messages, answers keep-alives."""

    def __init__(self, owner: Transports, listener: int) -> None:
        self.owner = owner
        self.listener = listener
        self.framer = StreamFramer(owner.max_message)
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.host = ""
        self.port = 0
        self.last_active = 0.0
        self.peer: Peer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.host, self.port = peer[0], peer[1]
        if not self.owner.register(self):
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.owner.loop.time()
        try:
            events = self.framer.feed(data)
        except SipError as exc:
            log.info("stream_unframeable", peer="%s:%d" % (self.host, self.port), reason=exc.reason)
            self.owner.counters_dropped += 1
            assert self.transport is not None
            self.transport.close()
            return
        peer = self.peer
        if peer is None:  # one per connection: its address and id never change
            peer = self.peer = Peer("tcp", self.host, self.port, self.listener, self.conn_id)
        for ev in events:
            if isinstance(ev, KeepAlivePing):
                assert self.transport is not None
                self.transport.write(b"\r\n")
            else:
                self.owner.deliver(ev.data, peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.unregister(self)


class Transports:
    """Owns every listening socket and stream connection."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Deliver,
        *,
        max_message: int = 65535,
        max_connections: int = 4096,
        idle_timeout: float = 600.0,
    ) -> None:
        self.loop = loop
        self.deliver = deliver
        self.max_message = max_message
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.udp: list[UdpListener] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: dict[int, StreamConnection] = {}
        self.bound: list[str] = []
        self.counters_dropped = 0
        self.undeliverable = 0
        self._next_conn = 0
        self._sweeper: asyncio.TimerHandle | None = None

    async def listen(self, addresses: list[ListenAddress]) -> None:
        """Bind every listener; raises OSError naming the address on failure."""
        for spec in addresses:
            try:
                if spec.transport == "udp":
                    index = len(self.udp)
                    transport, proto = await self.loop.create_datagram_endpoint(
                        lambda index=index: UdpListener(index, self.deliver),  # type: ignore[misc]
                        local_addr=(spec.host, spec.port),
                        reuse_port=False,
                    )
                    self.udp.append(proto)
                    port = transport.get_extra_info("sockname")[1]
                elif spec.transport == "tcp":
                    listener = len(self.servers)
                    server = await self.loop.create_server(
                        lambda listener=listener: StreamConnection(self, listener),  # type: ignore[misc]
                        host=spec.host,
                        port=spec.port,
                        reuse_address=True,
                        backlog=1024,
                    )
                    self.servers.append(server)
                    port = server.sockets[0].getsockname()[1]
                else:
                    raise OSError("transport %s is not available yet" % spec.transport)
            except OSError as exc:
                raise OSError("cannot listen on %s: %s" % (spec, exc.strerror or exc)) from None
            bound = ListenAddress(transport=spec.transport, host=spec.host, port=port)
            self.bound.append(str(bound))
            log.info("listening", listen=str(bound))
        self._sweeper = self.loop.call_later(min(self.idle_timeout, 30.0), self._sweep)

    def register(self, conn: StreamConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            log.warning(
                "connection_refused",
                reason="max_tcp_connections reached",
                peer="%s:%d" % (conn.host, conn.port),
            )
            return False
        self._next_conn += 1
        conn.conn_id = self._next_conn
        conn.last_active = self.loop.time()
        self.connections[conn.conn_id] = conn
        return True

    def unregister(self, conn: StreamConnection) -> None:
        self.connections.pop(conn.conn_id, None)

    def send(self, action: Send) -> None:
        peer = action.peer
        if peer.transport == "udp":
            listener = self.udp[peer.listener]
            if listener.transport is not None:
                listener.transport.sendto(action.data, (peer.host, peer.port))
            return
        conn = self.connections.get(peer.conn)
        if conn is None or conn.transport is None or conn.transport.is_closing():
            # §18.2.2 allows opening a new connection to the sent-by; pcproxy sits
            # behind a Front End that keeps its connection, so it counts the loss
            self.undeliverable += 1
            return
        conn.transport.write(action.data)

    def _sweep(self) -> None:
        cutoff = self.loop.time() - self.idle_timeout
        for conn in list(self.connections.values()):
            if conn.last_active < cutoff and conn.transport is not None:
                conn.transport.close()
        self._sweeper = self.loop.call_later(min(self.idle_timeout, 30.0), self._sweep)

    async def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for listener in self.udp:
            if listener.transport is not None:
                listener.transport.close()
        for server in self.servers:
            await server.wait_closed()
