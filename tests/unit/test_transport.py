"""The transport layer's outbound connections on real loopback sockets:
reuse of one connection under two names, and every user told when it goes
(RFC 3261 §18.1.1, §17.1.4)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.sip.peer import Peer, Send
from proxy.transport import Transports


class PoolServer:
    """A TCP peer on 127.0.0.1 that records what each connection sends."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while data := await reader.read(4096):
            self.received.append(data)

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_lost_connection_is_reported_under_every_name_that_used_it() -> None:
    pool = PoolServer()
    await pool.start()
    failed: list[Peer] = []
    transports = Transports(
        asyncio.get_running_loop(), lambda data, peer: None, on_failed=failed.append
    )
    by_name = Peer("tcp", "127.0.0.1", pool.port, name="pool.pcproxy.test")
    by_address = Peer("tcp", "127.0.0.1", pool.port)
    try:
        transports.send(Send(b"first", by_name))
        await wait_for(lambda: b"first" in b"".join(pool.received))
        transports.send(Send(b"second", by_address))
        transports.send(Send(b"third", by_address))
        await wait_for(lambda: b"third" in b"".join(pool.received))
        assert len(pool.writers) == 1, "the address reuses the connection opened by name"

        pool.writers[0].close()
        await wait_for(lambda: len(failed) == 2)
        assert set(failed) == {by_name, by_address}
        assert transports.outbound == {}
    finally:
        await transports.close()
        await pool.stop()


@pytest.mark.asyncio
async def test_a_refused_connection_is_reported_to_its_peer() -> None:
    pool = PoolServer()
    await pool.start()
    port = pool.port
    await pool.stop()  # nothing listens there now
    failed: list[Peer] = []
    transports = Transports(
        asyncio.get_running_loop(), lambda data, peer: None, on_failed=failed.append
    )
    peer = Peer("tcp", "127.0.0.1", port, name="pool.pcproxy.test")
    try:
        transports.send(Send(b"lost", peer))
        await wait_for(lambda: failed == [peer])
        assert transports.outbound == {}
    finally:
        await transports.close()
