"""Several workers: each names its own pool-side port toward pools, and
accepts the Routes another worker Record-Routed (RFC 3261 §16.4)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxy import reload
from proxy.cli import EXIT_BAD_INPUT, main
from proxy.config import ConfigError, ListenAddress, Settings, load_settings
from proxy.element import Listener
from proxy.sip.peer import Peer
from proxy.workers import (
    SupervisorError,
    as_bound,
    concrete_ports,
    pool_side_sockets,
    worker_count,
)

from .sipmsg import field_values, make_element
from .test_proxy_element import (
    CLIENT_UDP,
    POOL1,
    Client,
    Network,
    Pool,
    client_in_dialog,
    invite,
    uris,
)

SECRET = b"s" * 32
SHARED = [Listener("udp", "127.0.0.1", 5060, 0), Listener("tcp", "127.0.0.1", 5060, 0)]
WORKER_A = [
    Listener("udp", "127.0.0.1", 40001, 1, True),
    Listener("tcp", "127.0.0.1", 40002, 1, True),
]
WORKER_B = [
    Listener("udp", "127.0.0.1", 40003, 1, True),
    Listener("tcp", "127.0.0.1", 40004, 1, True),
]
EVERY_POOL_SIDE = [(lst.host, lst.port) for lst in WORKER_A + WORKER_B]


def worker(own: list[Listener]) -> Network:
    element = make_element(default_mode="proxy", secret=SECRET)
    element.set_listeners(SHARED + own, EVERY_POOL_SIDE)
    return Network(element, dns=[POOL1])


def call_through_worker_a() -> tuple[Client, Pool, bytes]:
    net = worker(WORKER_A)
    pool = Pool("pool1", POOL1, (100, 180, 200))
    uac = Client("client", CLIENT_UDP)
    net.attach(uac)
    net.attach(pool)
    uac.call(invite(CLIENT_UDP))
    net.advance()
    assert uac.statuses() == [100, 180, 200]
    (at_pool,) = pool.got(b"INVITE ")
    return uac, pool, at_pool


def test_a_worker_names_its_own_pool_side_port_in_via_and_the_pool_facing_record_route() -> None:
    _, pool, at_pool = call_through_worker_a()
    assert field_values(at_pool, "via")[0].startswith(b"SIP/2.0/UDP 127.0.0.1:40001;branch=")
    pool_facing, client_facing = uris(field_values(at_pool, "record-route"))
    assert b"@127.0.0.1:40001;transport=udp;lr>" in pool_facing
    assert b"@127.0.0.1:5060;transport=udp;lr>" in client_facing  # the shared port
    # the pool's requests in the dialog come back to worker A's own socket
    assert pool_facing.startswith(b"<sip:o.")


def test_another_worker_routes_the_clients_bye_straight_to_the_pool() -> None:
    uac, pool, _ = call_through_worker_a()
    (ok,) = uac.got(b"SIP/2.0 200 ")
    bye = client_in_dialog("BYE", ok, cseq=2)
    net_b = worker(WORKER_B)  # the BYE came in on worker B's copy of the shared port
    net_b.attach(uac)
    net_b.attach(pool)
    uac.send(bye)
    net_b.advance(1.0)
    (bye_at_pool,) = pool.got(b"BYE ")
    # both of pcproxy's Routes were B's own (A's pool-side port included): none forwarded
    assert field_values(bye_at_pool, "route") == []
    assert field_values(bye_at_pool, "via")[0].startswith(b"SIP/2.0/UDP 127.0.0.1:40003;")
    assert uac.statuses()[-1] == 200


def test_one_process_without_pool_side_listeners_uses_the_shared_port() -> None:
    net = Network(make_element(default_mode="proxy"), dns=[POOL1])
    net.element.set_listeners(SHARED)
    pool = Pool("pool1", POOL1, (200,))
    uac = Client("client", CLIENT_UDP)
    net.attach(uac)
    net.attach(pool)
    uac.call(invite(CLIENT_UDP))
    net.advance()
    (at_pool,) = pool.got(b"INVITE ")
    assert field_values(at_pool, "via")[0].startswith(b"SIP/2.0/UDP 127.0.0.1:5060;")


def test_worker_count_zero_means_one_per_available_core() -> None:
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_port_zero_is_made_concrete_once_for_every_worker() -> None:
    listen = [ListenAddress.parse("udp:127.0.0.1:0"), ListenAddress.parse("tcp:127.0.0.1:5999")]
    udp, tcp = concrete_ports(listen)
    assert udp.port != 0 and (udp.transport, udp.host) == ("udp", "127.0.0.1")
    assert tcp == listen[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:  # free to bind again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        again.bind(("127.0.0.1", udp.port))


def test_pool_side_sockets_one_per_transport_and_host_bound_and_listening() -> None:
    listen = [
        ListenAddress.parse(text)
        for text in ("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "udp:127.0.0.1:5070")
    ]
    specs, socks = pool_side_sockets(listen)
    try:
        assert [(s.transport, s.host) for s in specs] == [
            ("udp", "127.0.0.1"),
            ("tcp", "127.0.0.1"),
        ]
        assert all(s.port not in (0, 5060) for s in specs)
        assert [sock.getsockname()[1] for sock in socks] == [s.port for s in specs]
        with socket.create_connection(("127.0.0.1", specs[1].port), timeout=2):
            pass  # the TCP one listens already
    finally:
        for sock in socks:
            sock.close()


def test_an_unusable_host_is_a_supervisor_error() -> None:
    with pytest.raises(SupervisorError, match="192.0.2.1"):
        concrete_ports([ListenAddress.parse("udp:192.0.2.1:0")])


def test_a_peer_on_a_pool_side_listener_is_answered_from_it() -> None:
    element = make_element(default_mode="proxy", secret=SECRET)
    element.set_listeners(SHARED + WORKER_A, EVERY_POOL_SIDE)
    options = (
        b"OPTIONS sip:127.0.0.1:40001 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bK-o1\r\n"
        b"From: <sip:pool@pool.test>;tag=1\r\nTo: <sip:127.0.0.1:40001>\r\nCall-ID: o1\r\n"
        b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    actions = element.receive(options, Peer("udp", "192.0.2.21", 5060, 1), 0.0)
    (send,) = actions
    assert send.data.startswith(b"SIP/2.0 200 ")  # type: ignore[union-attr]
    assert send.peer.listener == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["-1", "257", "many"])
def test_serve_workers_out_of_range_is_a_one_line_error(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["serve", "--db", str(tmp_path / "t.db"), "--workers", value], prog_name="pcproxy"
    )
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("pcproxy: error: ") and "--workers" in line


def test_the_config_key_takes_zero_for_one_per_core_and_refuses_negatives(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nworkers = 3\n")
    assert load_settings(config).server.workers == 3
    config.write_text("[server]\nworkers = -2\n")
    with pytest.raises(ConfigError, match="server.workers"):
        load_settings(config)


def _listening(*specs: str) -> Settings:
    return Settings.model_validate({"server": {"listen": list(specs)}})


def test_a_reread_port_0_is_the_port_the_workers_are_bound_to() -> None:
    """A worker runs with the ports the supervisor bound for port 0; the same
    configuration re-read on SIGHUP must not report server.listen changed,
    nor ask for a restart: that was one false warning on every SIGHUP."""
    running = _listening("udp:127.0.0.1:40000", "tcp:[::1]:40001", "udp:127.0.0.1:5060")
    reread = _listening("udp:127.0.0.1:0", "tcp:[::1]:0", "udp:127.0.0.1:5060")
    assert as_bound(reread, running).server.listen == running.server.listen
    report = reload.apply(running, as_bound(reread, running), [])
    assert report.changed == [] and report.restart == []


@pytest.mark.parametrize(
    "reread",
    [
        ("udp:127.0.0.2:0", "tcp:[::1]:0"),  # another host
        ("tcp:127.0.0.1:0", "tcp:[::1]:0"),  # another transport
        ("udp:127.0.0.1:5062", "tcp:[::1]:0"),  # a fixed port
        ("udp:127.0.0.1:0",),  # one fewer
    ],
)
def test_a_real_change_of_listen_is_still_reported(reread: tuple[str, ...]) -> None:
    running = _listening("udp:127.0.0.1:40000", "tcp:[::1]:40001")
    report = reload.apply(running, as_bound(_listening(*reread), running), [])
    assert report.changed == ["server.listen"] and report.restart == ["server.listen"]
