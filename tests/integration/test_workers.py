"""``pcproxy serve --workers 2``: two worker processes behind a supervisor,
sharing the listening ports (SO_REUSEPORT), driven by SIPp.

Each call of the load tests comes from its own UDP port or TCP connection
(SIPp ``-t un`` / ``-t tn``) so the kernel spreads them over the workers;
each worker logs its counters when it stops, which shows both took calls.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from .conftest import PCPROXY, Daemon, cli, free_port, sipp, start_daemon, start_sipp
from .nsd import DnsServer
from .test_proxy import (  # noqa: F401  (fixtures)
    PoolNet,
    client,
    pool_member,
    pool_net,
    proxy_table,
    run_calls,
    start_proxy,
)
from .test_tls_pool import POOL, ca, nsd, pool_server, proxy_with_tls  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
WORKERS = 2
CALLS = 40


@pytest.fixture
def workers_daemon(table: Path) -> Iterator[Daemon]:
    d = start_daemon(table, "127.0.0.1", "--mode", "redirect", workers=WORKERS)
    yield d
    if d.proc.poll() is None:
        d.stop()


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """Worker number -> pid of its latest process, from the supervisor's log."""
    with daemon.lock:
        return {
            int(ev["worker"]): int(ev["pid"])  # type: ignore[call-overload]
            for ev in daemon.events
            if ev.get("event") == "worker_started"
        }


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever reaps it has stopped running)."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def counters_at_stop(daemon: Daemon) -> dict[int, dict[str, int]]:
    """Each worker's counters from its ``stopped`` line (after the daemon exited)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # the log reader may still be catching up
        with daemon.lock:
            if any(ev.get("event") == "stopped" and "workers" in ev for ev in daemon.events):
                break
        time.sleep(0.02)
    with daemon.lock:
        return {
            int(ev["worker"]): dict(ev["counters"])  # type: ignore[call-overload]
            for ev in daemon.events
            if ev.get("event") == "stopped" and "worker" in ev
        }


def redirect_load(daemon: Daemon, transport: str, tmp: Path, service: str = "ocschat") -> None:
    result = sipp(
        "redirect.xml",
        daemon,
        transport,
        service=service,
        tmp=tmp,
        calls=CALLS,
        socket_per_call=True,
        expect={"contact": r"<sip:%s@pcpool\.contoso\.com>" % service},
        timeout=60,
    )
    assert result.returncode == 0, result.errors + result.stdout


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_redirected_calls_spread_over_two_workers_without_a_failure(
    workers_daemon: Daemon, transport: str, tmp_path: Path
) -> None:
    redirect_load(workers_daemon, transport, tmp_path)
    assert workers_daemon.stop() == 0
    invites = {w: c.get("requests.INVITE", 0) for w, c in counters_at_stop(workers_daemon).items()}
    assert sorted(invites) == [0, 1]
    assert sum(invites.values()) == CALLS
    assert all(invites.values()), "one worker took every call: %s" % invites


def test_sighup_reaches_every_worker(table: Path, tmp_path: Path) -> None:
    config = tmp_path / "slow-poll.toml"
    config.write_text("[table]\npoll_interval = 10.0\n")  # only SIGHUP reloads in time
    daemon = start_daemon(
        table, "127.0.0.1", "--mode", "redirect", "--config", str(config), workers=WORKERS
    )
    try:
        done = cli(
            "endpoint", "new", "--sip-address", "sip:newchat@contoso.com",
            "--pool-fqdn", "pcpool.contoso.com", db=table,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        mark = daemon.mark()
        daemon.proc.send_signal(signal.SIGHUP)
        for index in range(WORKERS):
            daemon.wait_for("table_loaded", since=mark, why="sighup", worker=index, endpoints=3)
        redirect_load(daemon, "udp", tmp_path, service="newchat")
        assert daemon.stop() == 0
        served = {w: c.get("redirects", 0) for w, c in counters_at_stop(daemon).items()}
        assert sum(served.values()) == CALLS and all(served.values()), served
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()


def test_sigterm_drains_every_worker_and_exits_zero(workers_daemon: Daemon) -> None:
    pids = worker_pids(workers_daemon)
    assert len(pids) == WORKERS and all(alive(pid) for pid in pids.values())
    assert workers_daemon.stop(signal.SIGTERM) == 0
    assert counters_at_stop(workers_daemon).keys() == set(range(WORKERS))
    assert not any(alive(pid) for pid in pids.values())


def test_a_killed_worker_is_restarted_and_serves(workers_daemon: Daemon, tmp_path: Path) -> None:
    pids = worker_pids(workers_daemon)
    mark = workers_daemon.mark()
    os.kill(pids[0], signal.SIGKILL)
    workers_daemon.wait_for("worker_died", since=mark, worker=0, exit="signal SIGKILL")
    restarted = workers_daemon.wait_for("worker_restarted", since=mark, worker=0, timeout=10)
    assert restarted["pid"] != pids[0]
    workers_daemon.wait_for("worker_ready", since=mark, worker=0, pid=restarted["pid"])
    assert alive(pids[1])  # the other worker was left alone
    redirect_load(workers_daemon, "udp", tmp_path)
    assert workers_daemon.stop() == 0


def test_workers_drain_and_exit_when_the_supervisor_is_killed(workers_daemon: Daemon) -> None:
    pids = worker_pids(workers_daemon)
    workers_daemon.proc.kill()  # SIGKILL: no forwarding; the kernel tells the workers
    workers_daemon.proc.wait(10)
    deadline = time.monotonic() + 10  # the supervisor is gone: wait on the workers
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids.values())
    time.sleep(0.5)  # the log reader catches up with the workers' last lines
    with workers_daemon.lock:
        stopped = {ev.get("worker") for ev in workers_daemon.events if ev.get("event") == "stopped"}
    assert stopped == set(range(WORKERS))  # each drained, as after SIGTERM


def test_a_worker_that_cannot_bind_stops_the_service_with_status_1(table: Path) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # no SO_REUSEPORT
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [*PCPROXY, "serve", "--db", str(table), "--workers", str(WORKERS),
             "--listen", "tcp:127.0.0.1:%d" % port],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert '"worker_failed_to_start"' in done.stdout
    assert "cannot listen on tcp:127.0.0.1:%d" % port in done.stdout


# --- proxy mode through two workers -------------------------------------------------------
@pytest.fixture
def proxy_workers(tmp_path: Path, pool_net: PoolNet, proxy_table: Path) -> Iterator[Daemon]:
    daemon = start_proxy(proxy_table, pool_net, tmp_path, workers=WORKERS)
    yield daemon
    if daemon.proc.poll() is None:
        daemon.stop()


def pool_side_ports(daemon: Daemon) -> set[int]:
    ready = daemon.wait_for("ready", worker=None)
    return {int(str(spec).rsplit(":", 1)[1]) for spec in ready["pool_side"]}  # type: ignore[attr-defined]


def test_group_chat_flow_over_tcp_through_two_workers(
    proxy_workers: Daemon,
    pool_net: PoolNet,
    tmp_path: Path,
) -> None:
    calls = 4
    pool = pool_member(pool_net, "SRV_PORT", "gc_pool.xml", tmp_path, calls=calls)
    caller = client(proxy_workers, "gc_client.xml", tmp_path, calls=calls)
    run_calls(proxy_workers, caller, pool)
    # the pool was given a worker's own port, not the shared one, to come back to
    invites = [m for m in pool.messages() if m.first_line.startswith(b"INVITE ")]
    assert len(invites) == calls
    ports = pool_side_ports(proxy_workers)
    for m in invites:
        top_via = m.header("Via") or b""
        assert int(top_via.split(b";")[0].rsplit(b":", 1)[1]) in ports, top_via
        pool_facing = (m.header("Record-Route") or b"").split(b",")[0]
        assert any(b":%d;" % p in pool_facing for p in ports), pool_facing
    assert proxy_workers.stop() == 0


def test_proxied_calls_from_udp_clients_through_two_workers(
    proxy_workers: Daemon,
    pool_net: PoolNet,
    tmp_path: Path,
) -> None:
    calls = 3
    clients = 4  # each its own UDP source port: the kernel spreads them
    pool = pool_member(pool_net, "SRV_PORT", "pool_call.xml", tmp_path, calls=calls * clients)
    callers = [
        client(proxy_workers, "gc_call.xml", tmp_path, transport="udp", calls=calls, name="c%d" % i)
        for i in range(clients)
    ]
    for caller in callers[:-1]:
        run_calls(proxy_workers, caller)
    run_calls(proxy_workers, callers[-1], pool)
    assert proxy_workers.stop() == 0
    proxied = {w: c.get("proxied", 0) for w, c in counters_at_stop(proxy_workers).items()}
    assert sum(proxied.values()) == calls * clients, proxied


def test_ready_waits_for_every_worker(workers_daemon: Daemon) -> None:
    ready = workers_daemon.wait_for("ready", worker=None)
    worker_ready = [
        ev
        for ev in workers_daemon.events[: workers_daemon.events.index(ready)]
        if ev.get("event") == "worker_ready"
    ]
    assert sorted(int(ev["worker"]) for ev in worker_ready) == list(range(WORKERS))  # type: ignore[call-overload]
    assert ready["workers"] == WORKERS


def test_calls_to_a_mutual_tls_pool_through_two_workers(
    tmp_path: Path,
    ca: trustme.CA,
    nsd: DnsServer,
) -> None:
    pool = pool_server(ca, POOL)
    daemon = proxy_with_tls(tmp_path, ca, nsd, pool, workers=WORKERS)
    try:
        calls = 6
        result = sipp("gc_call.xml", daemon, "udp", calls=calls, tmp=tmp_path, socket_per_call=True)
        assert result.returncode == 0, result.stdout + result.errors
        ports = pool_side_ports(daemon)
    finally:
        daemon.stop()
        pool.stop()
    methods = [m.split(b" ", 1)[0] for m in pool.received]
    assert methods.count(b"INVITE") == calls and methods.count(b"BYE") == calls
    assert 1 <= pool.connections <= WORKERS  # one persistent connection per worker at most
    for invite in (m for m in pool.received if m.startswith(b"INVITE")):
        via = invite.split(b"\r\n")[1]
        assert via.startswith(b"Via: SIP/2.0/TLS 127.0.0.1:"), via
        assert int(via.split(b";")[0].rsplit(b":", 1)[1]) in ports, via


def test_proxied_calls_to_a_udp_pool_come_back_to_each_workers_own_port(
    proxy_workers: Daemon,
    pool_net: PoolNet,
    proxy_table: Path,
    tmp_path: Path,
) -> None:
    host, port = pool_net.member("SRV_PORT")
    mark = proxy_workers.mark()
    done = cli(
        "endpoint", "new", "--sip-address", "sip:udpchat@contoso.com",
        "--pool-fqdn", "fe1.pool-srv.pcproxy.test", "--pool-port", str(port),
        "--pool-transport", "udp", db=proxy_table,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for index in range(WORKERS):
        proxy_workers.wait_for("table_loaded", since=mark, worker=index, why="change")
    calls, clients = 3, 4
    pool = start_sipp(
        "pool_call.xml", tmp_path, "pool-udp", host=host, port=port, transport="udp",
        calls=calls * clients,
    )  # fmt: skip
    callers = [
        client(proxy_workers, "gc_call.xml", tmp_path, service="udpchat", transport="udp",
               calls=calls, name="u%d" % i)
        for i in range(clients)
    ]  # fmt: skip
    for caller in callers[:-1]:
        run_calls(proxy_workers, caller)
    run_calls(proxy_workers, callers[-1], pool)
    ports = pool_side_ports(proxy_workers)
    invites = [m for m in pool.messages() if m.first_line.startswith(b"INVITE ")]
    assert len(invites) >= calls * clients
    for m in invites:  # the pool answered each worker's own UDP socket
        top_via = m.header("Via") or b""
        assert top_via.startswith(b"SIP/2.0/UDP 127.0.0.1:"), top_via
        assert int(top_via.split(b";")[0].rsplit(b":", 1)[1]) in ports, top_via
    assert proxy_workers.stop() == 0
