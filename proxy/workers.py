"""Several worker processes behind one supervisor (``[server] workers``).

Theory of operation.  The supervisor prepares everything the workers must
agree on, then forks them before any event loop exists (uvloop is never
started in the supervisor, so no loop, thread or selector is inherited):

- **Shared ports.**  Every worker binds every ``[server] listen`` address
  itself with SO_REUSEPORT; the kernel hashes a UDP source 4-tuple, or a
  new TCP connection, to one socket of the group, so a client's
  retransmissions and its connection stay with one worker.  A listen port
  of 0 is made concrete first: the supervisor binds port 0, reads the
  port the kernel chose and closes the socket, then every worker binds
  that port.
- **Pool-side ports.**  For each listen (transport, host) the supervisor
  binds one socket per worker on an ephemeral port and keeps it open for
  the service's life; worker *i* serves its own (a restarted worker gets
  the same ports back).  The element names that socket in the Via of what
  it forwards toward a pool and in the pool-facing Record-Route URI, so the
  pool's responses (RFC 3261 §18.2.2: to the Via sent-by) and its
  in-dialog requests (the route set, §12.1.2) come back to the worker
  holding the transaction.  Every worker knows every worker's pool-side
  addresses as its own (Route popping, §16.4; Via checks).
- **One secret.**  The key of the Record-Route tokens and the loop hashes
  is read (or drawn) once, so any worker accepts the tokens of another.

The supervisor then waits: SIGHUP is forwarded to every ready worker (each
re-reads the configuration and reloads the table, which each also polls);
the first SIGTERM/SIGINT is
forwarded as SIGTERM (every worker drains) and a second one again (they
exit at once); a worker that dies unexpectedly is restarted after a
back-off (0.5 s doubling to 30 s, reset once it has served for a minute).
A worker that cannot start the first time (a port in use, a bad
certificate) stops the service: the supervisor exits 1.  After a clean
drain of every worker it exits 0.

Workers run in their own process group, so a terminal's Ctrl-C reaches
only the supervisor, and get SIGTERM if the supervisor dies.  The
supervisor is systemd's main process and alone speaks sd_notify: READY once
every worker is ready, RELOADING/READY around a forwarded SIGHUP, STOPPING.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from proxy.config import ListenAddress, Settings
from proxy.log import tag as tag_logs
from proxy.notify import Notifier

log = structlog.get_logger("workers")

#: Restart back-off: the first delay, its ceiling, and how long a worker must
#: serve before its failures are forgotten.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
RESTART_RESET_AFTER = 60.0
#: Backlog of the pool-side TCP/TLS listeners.
BACKLOG = 1024
_PR_SET_PDEATHSIG = 1


def worker_count(configured: int) -> int:
    """``[server] workers``, with 0 meaning one per CPU core this process may use."""
    return configured if configured > 0 else len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker needs beyond the settings: its number, the shared
    secret, its own pool-side sockets and every worker's pool-side address."""

    index: int
    secret: bytes
    pool_side: list[ListenAddress]
    sockets: list[socket.socket]
    pool_addresses: tuple[tuple[str, int], ...]
    ready_fd: int = -1

    def ready(self) -> None:
        """Tell the supervisor every listener is bound."""
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"r")
                os.close(self.ready_fd)


class SupervisorError(Exception):
    """The service cannot be prepared (a port cannot be bound, a secret read)."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def as_bound(new: Settings, running: Settings) -> Settings:
    """``new``, a configuration a worker re-read on SIGHUP, with each listen
    port 0 given the port the supervisor bound for it (``concrete_ports``):
    the worker runs with the bound ports, and a re-read port 0 that names
    the same address is no change of ``server.listen`` (nor a restart to
    ask for).  Any other difference stays, and is reported as one."""
    bound = running.server.listen
    configured = new.server.listen
    if len(configured) != len(bound):
        return new
    listen = [
        was if spec.port == 0 and (spec.transport, spec.host) == (was.transport, was.host) else spec
        for spec, was in zip(configured, bound, strict=True)
    ]
    server = new.server.model_copy(update={"listen": listen})
    return new.model_copy(update={"server": server})


def _kind(transport: str) -> socket.SocketKind:
    return socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM


def concrete_ports(listen: list[ListenAddress]) -> list[ListenAddress]:
    """Every listen address with port 0 given the port the kernel picks for
    it now (bound with SO_REUSEPORT, then closed), so all workers share it."""
    out = []
    for spec in listen:
        if spec.port == 0:
            try:
                with socket.socket(_family(spec.host), _kind(spec.transport)) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind((spec.host, 0))
                    port = sock.getsockname()[1]
            except OSError as exc:
                raise SupervisorError(
                    "cannot listen on %s: %s" % (spec, exc.strerror or exc)
                ) from None
            spec = spec.model_copy(update={"port": port})
        out.append(spec)
    return out


def pool_side_sockets(
    listen: list[ListenAddress],
) -> tuple[list[ListenAddress], list[socket.socket]]:
    """One socket on an ephemeral port per listen (transport, host), bound
    (and listening, for TCP/TLS) now; with the address each got."""
    specs: list[ListenAddress] = []
    socks: list[socket.socket] = []
    seen: set[tuple[str, str]] = set()
    for spec in listen:
        if (spec.transport, spec.host) in seen:
            continue
        seen.add((spec.transport, spec.host))
        sock = socket.socket(_family(spec.host), _kind(spec.transport))
        try:
            sock.bind((spec.host, 0))
            if spec.transport != "udp":
                sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            for other in socks:
                other.close()
            raise SupervisorError(
                "cannot bind a pool-side port on %s: %s" % (spec.host, exc.strerror or exc)
            ) from None
        specs.append(spec.model_copy(update={"port": sock.getsockname()[1]}))
        socks.append(sock)
    return specs, socks


@dataclass
class _Slot:
    """One worker position: its pool-side sockets outlive its processes."""

    index: int
    pool_side: list[ListenAddress]
    sockets: list[socket.socket]
    pid: int = 0
    ready_fd: int = -1  # the supervisor's end of the readiness pipe
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    status: int = 0
    exits: list[int] = field(default_factory=list)


Runner = Callable[[Settings, WorkerPlan], int]


class Supervisor:
    """Starts ``count`` workers running ``runner`` and keeps them running."""

    def __init__(self, settings: Settings, count: int, runner: Runner, secret: bytes) -> None:
        self.settings = settings
        self.count = count
        self.runner = runner
        self.secret = secret
        self.slots: list[_Slot] = []
        self.stopping = 0
        self.failed = False
        self._signals: list[int] = []
        self._wakeup = (-1, -1)
        self._announced = False
        self.pid = os.getpid()
        #: systemd's main process is the supervisor: it speaks for the workers.
        self.notifier = Notifier()

    # set-up -----------------------------------------------------------------
    def prepare(self) -> None:
        """Concrete listen ports and every worker's pool-side sockets."""
        listen = concrete_ports(self.settings.server.listen)
        server = self.settings.server.model_copy(update={"listen": listen})
        self.settings = self.settings.model_copy(update={"server": server})
        try:
            for index in range(self.count):
                specs, socks = pool_side_sockets(listen)
                self.slots.append(_Slot(index, specs, socks))
        except SupervisorError:
            self._close_sockets()
            raise
        self.pool_addresses = tuple(
            (spec.host, spec.port) for slot in self.slots for spec in slot.pool_side
        )

    def _close_sockets(self) -> None:
        for slot in self.slots:
            for sock in slot.sockets:
                sock.close()

    # the loop ---------------------------------------------------------------
    def run(self) -> int:
        """Start the workers and supervise them until they are all gone."""
        self._install_signals()
        try:
            for slot in self.slots:
                self._start(slot)
            while any(slot.pid for slot in self.slots) or self._restart_pending():
                self._wait()
                self._read_ready()
                self._handle_signals()
                self._reap()
                self._restart_due()
        finally:
            self._close_sockets()
            for fd in self._wakeup:
                os.close(fd)
            signal.set_wakeup_fd(-1)
        if self.failed:
            return 1
        code = 0 if all(not s.exits or s.exits[-1] == 0 for s in self.slots) else 1
        log.info("stopped", workers=self.count, status=code)
        return code

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _restart_pending(self) -> bool:
        return not self.stopping and any(s.restart_at is not None for s in self.slots)

    def _wait(self) -> None:
        """Sleep until a signal, a readiness byte or the next restart is due."""
        timeout = 1.0
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None:
                timeout = max(0.0, min(timeout, slot.restart_at - now))
        fds = [self._wakeup[0], *(s.ready_fd for s in self.slots if s.ready_fd >= 0)]
        if not self._signals:
            with contextlib.suppress(InterruptedError):
                select.select(fds, [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup[0], 512):
                pass

    def _handle_signals(self) -> None:
        pending, self._signals = self._signals, []
        for signum in pending:
            if signum == signal.SIGCHLD:
                continue
            sig = signal.Signals(signum)
            if signum == signal.SIGHUP:
                # a worker not ready yet loads the table as it starts
                ready = [s for s in self.slots if s.pid and s.ready]
                log.info("signal", signal=sig.name, forwarded=len(ready))
                self.notifier.reloading()
                for slot in ready:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGHUP)
                # each worker reloads on its own and logs its `reloaded` line
                self.notifier.ready("reload sent to %d workers" % len(ready))
                continue
            self.stopping += 1
            if self.stopping == 1:
                self.notifier.stopping()
            log.info("signal", signal=sig.name, count=self.stopping, forwarded=self._live())
            for slot in self.slots:
                slot.restart_at = None
            self._kill_all(signal.SIGTERM)

    def _live(self) -> int:
        return sum(1 for s in self.slots if s.pid)

    def _kill_all(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def _read_ready(self) -> None:
        for slot in self.slots:
            if slot.ready_fd < 0:
                continue
            try:
                data = os.read(slot.ready_fd, 16)
            except BlockingIOError:
                continue
            if data:
                slot.ready = slot.ever_ready = True
                log.info("worker_ready", worker=slot.index, pid=slot.pid)
            os.close(slot.ready_fd)  # readiness said, or the worker is gone
            slot.ready_fd = -1
        if not self._announced and all(s.ready for s in self.slots):
            self._announced = True
            log.info(
                "ready",
                workers=self.count,
                listen=[str(spec) for spec in self.settings.server.listen],
                pool_side=[str(spec) for s in self.slots for spec in s.pool_side],
            )
            self.notifier.ready("serving with %d workers" % self.count)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if self.stopping and code == -signal.SIGTERM and not slot.ready:
            code = 0  # stopped while starting, before it had anything to drain
        slot.pid, slot.ready = 0, False
        slot.exits.append(code)
        if slot.ready_fd >= 0:
            os.close(slot.ready_fd)
            slot.ready_fd = -1
        if self.stopping:
            log.info("worker_stopped", worker=slot.index, status=code)
            return
        how = "signal %s" % signal.Signals(-code).name if code < 0 else "status %d" % code
        if not slot.ever_ready:
            # it never served: the next start would fail alike (port in use...)
            log.error("worker_failed_to_start", worker=slot.index, exit=how)
            self.failed = True
            self.stopping += 1
            for other in self.slots:
                other.restart_at = None
            self._kill_all(signal.SIGTERM)
            return
        now = time.monotonic()
        if now - slot.started >= RESTART_RESET_AFTER:
            slot.failures = 0
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2**slot.failures)
        slot.failures += 1
        slot.restart_at = now + delay
        log.error("worker_died", worker=slot.index, exit=how, restart_in=delay)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._start(slot)
                log.info("worker_restarted", worker=slot.index, pid=slot.pid)

    # one worker -------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            self._child(slot, w)
        os.close(w)
        os.set_blocking(r, False)
        slot.pid, slot.ready_fd, slot.started = pid, r, time.monotonic()
        log.info("worker_started", worker=slot.index, pid=pid)

    def _child(self, slot: _Slot, ready_fd: int) -> None:
        """In the forked worker: shed the supervisor's state, then serve."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server takes it
            os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor alone
            _die_with(self.pid)
            for fd in self._wakeup:
                os.close(fd)
            for other in self.slots:
                if other.ready_fd >= 0:
                    os.close(other.ready_fd)
                if other is not slot:
                    for sock in other.sockets:
                        sock.close()
            self.notifier.close()
            tag_logs(worker=slot.index)  # every line of this worker says which
            plan = WorkerPlan(
                slot.index,
                self.secret,
                slot.pool_side,
                slot.sockets,
                self.pool_addresses,
                ready_fd,
            )
            code = self.runner(self.settings, plan)
        except BaseException as exc:  # a worker never returns into the supervisor's code
            if isinstance(exc, SystemExit) and isinstance(exc.code, int):
                code = exc.code
            else:
                log.exception("worker_crashed")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _die_with(supervisor: int) -> None:
    """Ask Linux to send SIGTERM when the supervisor dies (prctl
    PR_SET_PDEATHSIG); a worker whose supervisor is already gone stops now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), errno.errorcode.get(ctypes.get_errno(), "prctl"))
    if os.getppid() != supervisor:
        raise SystemExit(0)


def supervise(settings: Settings, count: int, runner: Runner, secret: bytes) -> int:
    """Run ``count`` workers of the service; the exit status of the whole."""
    supervisor = Supervisor(settings, count, runner, secret)
    try:
        supervisor.prepare()
    except SupervisorError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    log.info("supervising", workers=count, pid=os.getpid())
    return supervisor.run()
