"""The only place that touches sockets: UDP, TCP and TLS listeners, stream
framing buffers and the connection table (RFC 3261 §18).

Every received datagram or framed stream message is handed to one callback
as ``(data, Peer)``; ``Transports.send`` puts the core's ``Send`` actions on
the wire: UDP from the listener the peer names, TCP/TLS on the connection
the peer names (a response goes back on the connection its request came in
on, §18.2.2), or, for a peer with no connection (a pool server), on the
persistent connection to that address, opened on first use and reused
afterwards (§18.1.1).  A connection that cannot be opened, or a named one
that is gone, is reported to ``on_failed(peer)`` so the core can fail the
client transactions waiting on it over to the next target (§17.1.4).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from proxy.config import ListenAddress
from proxy.sip.errors import SipError
from proxy.sip.framing import KeepAlivePing, StreamFramer
from proxy.sip.peer import Peer, Send
from proxy.tls import certificate_names
from proxy.transport.handshake import describe, observe_handshakes

Deliver = Callable[[bytes, Peer], None]
Failed = Callable[[Peer], object]
#: Whether a TLS listener accepts the peer that presented this certificate.
#: Seconds to open an outbound connection (TLS handshake included).
CONNECT_TIMEOUT = 10.0

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
    """One TCP or TLS connection, accepted or opened: frames messages,
    answers keep-alives."""

    def __init__(
        self, owner: Transports, listener: int, kind: str = "tcp", target: Peer | None = None
    ) -> None:
        self.owner = owner
        self.listener = listener
        self.kind = kind
        self.target = target  # the pool server an outbound connection was opened to
        self.framer = StreamFramer(owner.max_message)
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.host = target.host if target is not None else ""
        self.port = target.port if target is not None else 0
        self.last_active = 0.0
        self.peer: Peer | None = None
        self.pending: list[bytes] = []
        #: Every outbound key this connection serves, with the peer first
        #: sent under it: the target's own, and the names of the same
        #: address that reuse it (a pool server's Contact).  All are told
        #: when the connection goes.
        self.users: dict[tuple[str, str, int, str], Peer] = {}
        if target is not None:
            self.users[(target.transport, target.host, target.port, target.name)] = target
        #: SIP domain identities (RFC 5922 §7.1) of the verified certificate
        #: of an accepted TLS connection's peer; None on other connections.
        self.peer_names: tuple[str, ...] | None = None
        self.registered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.target is None:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.host, self.port = peer[0], peer[1]
            if self.kind == "tls":
                cert = transport.get_extra_info("peercert")
                self.peer_names = tuple(certificate_names(cert)) if cert else ()
        if not self.owner.register(self):
            transport.close()
            return
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)  # still connecting
        else:
            self.transport.write(data)

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
            peer = self.peer = Peer(self.kind, self.host, self.port, self.listener, self.conn_id)
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
        max_connections_per_source: int = 64,
        idle_timeout: float = 600.0,
        on_failed: Failed | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self.loop = loop
        self.deliver = deliver
        self.on_failed = on_failed or (lambda peer: None)
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        #: Handshakes on TLS listeners that failed, or whose peer certificate
        #: names no allowed peer (``[tls] allowed_peers``).
        self.tls_handshake_failures = 0
        self.outbound: dict[tuple[str, str, int, str], StreamConnection] = {}
        #: (transport, host, port, number) of every bound socket; ``number``
        #: is the ``Peer.listener`` of what arrives on it.
        self.listeners: list[tuple[str, str, int, int]] = []
        self.max_message = max_message
        self.max_connections = max_connections
        #: Accepted connections one source address may hold; may be changed
        #: at run time (a reload), applies to the next accept.
        self.max_connections_per_source = max_connections_per_source
        self._per_source: Counter[str] = Counter()
        #: ``connections_refused_total`` (max_tcp_connections reached) and
        #: ``connections_refused_per_source`` (max_connections_per_source).
        self.counters: Counter[str] = Counter()
        self.idle_timeout = idle_timeout
        self.udp: list[UdpListener] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: dict[int, StreamConnection] = {}
        self.bound: list[str] = []
        self.counters_dropped = 0
        self.undeliverable = 0
        self._next_conn = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._observing = False

    async def listen(
        self,
        addresses: list[ListenAddress],
        *,
        reuse_port: bool = False,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        """Bind every listener; raises OSError naming the address on failure.

        ``reuse_port``: SO_REUSEPORT, so the workers of one service each bind
        the same address and the kernel spreads flows over them.
        ``sockets``: already bound (and, for TCP/TLS, listening) sockets to
        serve instead of binding, one per address.
        """
        if self.server_ssl is not None and not self._observing:
            observe_handshakes(self.server_ssl, self._handshake_failed)
            self._observing = True
        for i, spec in enumerate(addresses):
            sock = sockets[i] if sockets is not None else None
            where: dict[str, Any] = {"sock": sock} if sock is not None else {}
            try:
                if spec.transport == "udp":
                    index = len(self.udp)
                    if sock is None:
                        where = {"local_addr": (spec.host, spec.port), "reuse_port": reuse_port}
                    transport, proto = await self.loop.create_datagram_endpoint(
                        lambda index=index: UdpListener(index, self.deliver),  # type: ignore[misc]
                        **where,
                    )
                    self.udp.append(proto)
                    port = transport.get_extra_info("sockname")[1]
                    number = index
                else:
                    if spec.transport == "tls" and self.server_ssl is None:
                        raise OSError("no [tls] certificate configured")
                    number = len(self.servers)
                    kind = spec.transport
                    if sock is None:
                        where = {"host": spec.host, "port": spec.port, "reuse_address": True}
                        if reuse_port:
                            where["reuse_port"] = True
                    server = await self.loop.create_server(
                        lambda n=number, k=kind: StreamConnection(self, n, k),
                        backlog=1024,
                        ssl=self.server_ssl if kind == "tls" else None,
                        **where,
                    )
                    self.servers.append(server)
                    port = server.sockets[0].getsockname()[1]
            except OSError as exc:
                raise OSError("cannot listen on %s: %s" % (spec, exc.strerror or exc)) from None
            bound = ListenAddress(transport=spec.transport, host=spec.host, port=port)
            self.bound.append(str(bound))
            self.listeners.append((spec.transport, spec.host, port, number))
            log.info("listening", listen=str(bound))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(min(self.idle_timeout, 30.0), self._sweep)

    def _handshake_failed(self, exc: ssl.SSLError) -> None:
        self.tls_handshake_failures += 1
        log.info("tls_handshake_failed", failures=self.tls_handshake_failures, **describe(exc))

    def register(self, conn: StreamConnection) -> bool:
        """Admit an accepted or opened connection; an accepted one is refused
        when the connection table or its source's share is full."""
        if conn.target is None:
            reason = None
            if len(self.connections) >= self.max_connections:
                reason, counter = "max_tcp_connections reached", "connections_refused_total"
            elif self._per_source[conn.host] >= self.max_connections_per_source:
                reason, counter = (
                    "max_connections_per_source reached",
                    "connections_refused_per_source",
                )
            if reason is not None:
                count = self.counters[counter] = self.counters[counter] + 1
                if count & (count - 1) == 0:  # 1, 2, 4, 8...: a flood must not flood the log
                    log.warning(
                        "connection_refused",
                        reason=reason,
                        peer="%s:%d" % (conn.host, conn.port),
                        count=count,
                    )
                return False
            self._per_source[conn.host] += 1
        conn.registered = True
        self._next_conn += 1
        conn.conn_id = self._next_conn
        conn.last_active = self.loop.time()
        self.connections[conn.conn_id] = conn
        return True

    def unregister(self, conn: StreamConnection) -> None:
        if conn.registered and conn.target is None:
            conn.registered = False
            left = self._per_source[conn.host] - 1
            if left > 0:
                self._per_source[conn.host] = left
            else:
                del self._per_source[conn.host]
        self.connections.pop(conn.conn_id, None)
        for key, user in conn.users.items():
            if self.outbound.get(key) is conn:
                del self.outbound[key]
            self.on_failed(user)  # what still waits on it will not be answered

    def send(self, action: Send) -> None:
        peer = action.peer
        if peer.transport == "udp":
            listener = self.udp[peer.listener] if peer.listener < len(self.udp) else None
            if listener is None or listener.transport is None:
                self.undeliverable += 1
                self.on_failed(peer)
                return
            listener.transport.sendto(action.data, (peer.host, peer.port))
            return
        if not peer.conn:
            self._outbound(peer).write(action.data)
            return
        conn = self.connections.get(peer.conn)
        if (
            conn is None
            or conn.transport is None
            or conn.transport.is_closing()
            or (conn.host, conn.port) != (peer.host, peer.port)
        ):
            # §18.2.2 allows opening a new connection to the sent-by; pcproxy sits
            # behind a Front End that keeps its connection, so it counts the loss
            self.undeliverable += 1
            self.on_failed(peer)
            return
        conn.transport.write(action.data)

    def _outbound(self, peer: Peer) -> StreamConnection:
        """The persistent connection to a server, opened on first use."""
        key = (peer.transport, peer.host, peer.port, peer.name)
        conn = self.outbound.get(key)
        if conn is None and (not peer.name or peer.name == peer.host):
            # a URI naming the address itself (a pool server's Contact) reuses
            # the connection already open, and authenticated, to that address;
            # later sends find it under their own key
            for (transport, host, port, _), other in self.outbound.items():
                if (transport, host, port) == key[:3]:
                    conn = self.outbound[key] = other
                    other.users.setdefault(key, peer)
                    break
        if conn is None or (conn.transport is not None and conn.transport.is_closing()):
            conn = StreamConnection(self, peer.listener, peer.transport, peer)
            self.outbound[key] = conn
            self.loop.create_task(self._connect(conn, peer))
        return conn

    async def _connect(self, conn: StreamConnection, peer: Peer) -> None:
        context: ssl.SSLContext | None = None
        if peer.transport == "tls":
            context = self.client_ssl() if self.client_ssl is not None else None
            if context is None:
                context = ssl.create_default_context()
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn,
                    peer.host,
                    peer.port,
                    ssl=context,
                    server_hostname=(peer.name or peer.host) if context is not None else None,
                ),
                CONNECT_TIMEOUT,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info(
                "connect_failed",
                peer="%s:%s:%d" % (peer.transport, peer.host, peer.port),
                error=str(exc) or type(exc).__name__,
            )
            conn.pending.clear()
            for key, user in conn.users.items():
                if self.outbound.get(key) is conn:
                    del self.outbound[key]
                self.on_failed(user)

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
        self.on_failed = lambda peer: None
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for listener in self.udp:
            if listener.transport is not None:
                listener.transport.close()
        for server in self.servers:
            await server.wait_closed()
