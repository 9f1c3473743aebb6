"""Connection bounds at accept (``Transports.register``) and the shell's reload hook."""

from __future__ import annotations

import asyncio
from typing import cast

from proxy.config import Settings
from proxy.server import Server
from proxy.sip.peer import Peer
from proxy.transport import StreamConnection, Transports


class FakeLoop:
    def time(self) -> float:
        return 0.0


def transports(total: int = 10, per_source: int = 2) -> Transports:
    loop = cast(asyncio.AbstractEventLoop, FakeLoop())
    return Transports(
        loop, lambda data, peer: None, max_connections=total, max_connections_per_source=per_source
    )


def accepted(owner: Transports, host: str) -> StreamConnection:
    conn = StreamConnection(owner, 0)
    conn.host, conn.port = host, 40000
    return conn


def test_each_source_has_its_own_share_of_connections() -> None:
    t = transports(per_source=2)
    a = [accepted(t, "10.0.0.1") for _ in range(3)]
    assert [t.register(c) for c in a] == [True, True, False]
    assert t.register(accepted(t, "10.0.0.2"))
    assert t.counters == {"connections_refused_per_source": 1}
    t.unregister(a[2])  # a refused connection frees nothing
    assert not t.register(accepted(t, "10.0.0.1"))
    t.unregister(a[0])
    assert t.register(accepted(t, "10.0.0.1"))


def test_the_total_bound_still_applies_and_outbound_connections_are_not_counted() -> None:
    t = transports(total=2, per_source=5)
    assert t.register(accepted(t, "10.0.0.1")) and t.register(accepted(t, "10.0.0.2"))
    assert not t.register(accepted(t, "10.0.0.3"))
    assert t.counters == {"connections_refused_total": 1}
    pool = StreamConnection(t, 0, "tls", Peer("tls", "10.0.0.9", 5041, name="pool.contoso.com"))
    assert t.register(pool)


def test_reload_swaps_the_security_settings() -> None:
    server = Server(Settings())
    server.transports = transports(per_source=2)
    new = Settings.model_validate(
        {"security": {"trusted_networks": ["192.168.0.0/16"], "max_connections_per_source": 7}}
    )
    server.reconfigure_security(new)
    assert [str(n) for n in server.admission.networks] == ["192.168.0.0/16"]
    assert server.transports.max_connections_per_source == 7
