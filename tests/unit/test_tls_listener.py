"""TLS listeners of the transport layer: failed handshakes are counted and
logged in one line, a connection carries its peer's certificate names (for
``allowed_peers``, enforced by proxy.admission), OPTIONS reaches the core.

Real handshakes over loopback under uvloop, as the daemon runs; certificates
from the ``pki`` fixture of ``test_tls``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import uvloop
from structlog.testing import capture_logs

from proxy.config import ListenAddress
from proxy.sip.peer import Peer
from proxy.tls import ServerContexts, TlsSettings, client_context
from proxy.transport import Transports

from .test_tls import FE, Pki, connect, fe_settings, pki, pool_settings

__all__ = ["pki"]  # the fixture, shared with test_tls

Received = list[tuple[bytes, Peer]]
Scenario = Callable[[Transports, int, Received], Awaitable[None]]


def run_listener(settings: TlsSettings, scenario: Scenario) -> tuple[Transports, Received]:
    """Run ``scenario(transports, port, received)`` against one tls: listener."""

    async def main() -> tuple[Transports, Received]:
        loop = asyncio.get_running_loop()
        contexts = ServerContexts(settings)
        received: Received = []
        transports = Transports(
            loop,
            lambda data, peer: received.append((data, peer)),
            server_ssl=contexts.base_context,
        )
        await transports.listen([ListenAddress.parse("tls:127.0.0.1:0")])
        try:
            await scenario(transports, transports.listeners[0][2], received)
        finally:
            await transports.close()
        return transports, received

    return uvloop.run(main())


async def closed_without_answer(client_ctx: ssl.SSLContext, port: int) -> bool:
    try:
        client = await connect(port, client_ctx)
        client.writer.write(b"OPTIONS sip:pcproxy.invalid SIP/2.0\r\n\r\n")
        data = await asyncio.wait_for(client.reader.read(100), 2.0)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""


async def settle(condition: Callable[[], bool]) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.02)


def test_failed_handshakes_are_counted_and_logged_without_traceback(pki: Pki) -> None:
    async def scenario(t: Transports, port: int, received: Received) -> None:
        assert await closed_without_answer(client_context(fe_settings(pki)), port)  # no cert
        await settle(lambda: t.tls_handshake_failures == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # plain TCP
        writer.write(b"OPTIONS sip:pcproxy.invalid SIP/2.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(100), 2.0) == b""
        writer.close()
        await settle(lambda: t.tls_handshake_failures == 2)
        stranger = client_context(fe_settings(pki, pki.stranger))  # another CA
        assert await closed_without_answer(stranger, port)
        await settle(lambda: t.tls_handshake_failures == 3)

    with capture_logs() as logs:
        transports, _ = run_listener(pool_settings(pki), scenario)
    assert transports.tls_handshake_failures == 3
    failed = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert [e["reason"] for e in failed] == [
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "WRONG_VERSION_NUMBER",
        "CERTIFICATE_VERIFY_FAILED",
    ]
    assert failed[2]["detail"] == "unable to get local issuer certificate"
    assert [e["failures"] for e in failed] == [1, 2, 3]
    assert all(e["log_level"] == "info" and "exc_info" not in e for e in failed)


def test_an_accepted_connection_carries_its_peers_certificate_names(pki: Pki) -> None:
    """What ``[tls] allowed_peers`` is checked against, request by request
    (proxy.admission): the names of the verified client certificate."""
    settings = pool_settings(pki, allowed_peers=["fe2.contoso.com"])
    names: list[tuple[str, ...] | None] = []

    async def scenario(t: Transports, port: int, received: Received) -> None:
        client = await connect(port, client_context(fe_settings(pki, pki.fe)))
        client.writer.write(b"OPTIONS sip:pcproxy.invalid SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        await client.writer.drain()
        await settle(lambda: bool(received))
        names.extend(conn.peer_names for conn in t.connections.values())
        await client.close()

    transports, _ = run_listener(settings, scenario)
    assert names == [(FE,)]
    assert transports.tls_handshake_failures == 0  # refusing is admission's part, not TLS's


def test_an_allowed_peer_reaches_the_core(pki: Pki) -> None:
    settings = pool_settings(pki, allowed_peers=[FE])
    message = b"OPTIONS sip:pcproxy.invalid SIP/2.0\r\nContent-Length: 0\r\n\r\n"

    async def scenario(t: Transports, port: int, received: Received) -> None:
        client = await connect(port, client_context(fe_settings(pki, pki.fe)))
        client.writer.write(message)
        await client.writer.drain()
        await settle(lambda: bool(received))
        await client.close()

    with capture_logs() as logs:
        transports, received = run_listener(settings, scenario)
    assert transports.tls_handshake_failures == 0
    assert not [e for e in logs if e["event"] == "tls_handshake_failed"]
    [(data, peer)] = received
    assert data == message and peer.transport == "tls"
