"""The daemon: wiring, lifecycle and signals around the pure element.

The shell is thin.  It hands every received message to ``Element.receive``
with the loop's clock, sends what comes back, and arms one timer for the
element's next deadline.  The endpoint table is watched from a thread (SQLite
``PRAGMA data_version``, RFC-free but cheap): a new snapshot is loaded and
validated there, off the loop, and swapped in by rebinding one reference.
A table that fails to load leaves the previous snapshot in service.

Signals: SIGHUP reloads the table; SIGTERM/SIGINT stop accepting (new
requests get 503 with Retry-After), let in-flight transactions finish within
``server.drain_timeout`` and exit 0; a second SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from proxy.config import Settings
from proxy.element import Element, ElementConfig
from proxy.sip.peer import Peer
from proxy.sip.transaction import Timers
from proxy.store import EndpointStore, Snapshot
from proxy.transport import Transports

log = structlog.get_logger("server")


class TableWatcher(threading.Thread):
    """Polls the table's ``data_version`` and loads a new snapshot on change.

    ``data_version`` changes when another connection (``pcproxy endpoint``)
    commits; loading and validating happen on this thread, and ``publish``
    hands the new snapshot to the loop.  The first snapshot is loaded by
    ``initial()`` before the listeners open.
    """

    def __init__(
        self, path: Path, interval: float, publish: Callable[[Snapshot, str], object]
    ) -> None:
        super().__init__(name="table-watcher", daemon=True)
        self.path = path
        self.interval = interval
        self.publish = publish
        self.reload_requested = threading.Event()
        self.stopped = threading.Event()
        self._store: EndpointStore | None = None
        self._version: int | None = None

    def initial(self) -> Snapshot:
        self._store = EndpointStore(self.path)
        self._version = self._store.data_version()
        return self._store.load_snapshot()

    def run(self) -> None:
        while not self.stopped.is_set():
            forced = self.reload_requested.wait(self.interval)
            self.reload_requested.clear()
            if self.stopped.is_set():
                break
            try:
                if self._store is None:
                    self._store = EndpointStore(self.path)
                current = self._store.data_version()
                if forced or current != self._version:
                    snapshot = self._store.load_snapshot()
                    self._version = current
                    self.publish(snapshot, "sighup" if forced else "change")
            except Exception as exc:  # the daemon keeps serving the old snapshot
                log.error(
                    "table_load_failed",
                    path=str(self.path),
                    error=str(exc),
                    kind=type(exc).__name__,
                )
                if self._store is not None:
                    self._store.close()
                self._store = None
        if self._store is not None:
            self._store.close()


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        sip = settings.sip
        self.element_config = ElementConfig(
            default_mode=settings.server.mode,
            server_name=settings.server.server_name,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            max_headers=sip.max_headers,
        )
        self.element: Element | None = None
        self.transports: Transports | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stop = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        table = self.settings.table
        watcher = TableWatcher(
            table.path,
            table.poll_interval,
            lambda snap, why: loop.call_soon_threadsafe(self._swap, snap, why),
        )
        snapshot = watcher.initial()
        log.info(
            "table_loaded",
            path=str(table.path),
            endpoints=len(snapshot),
            generation=snapshot.generation,
            why="start",
        )
        self.element = Element(snapshot, self.element_config)
        sip = self.settings.sip
        self.transports = Transports(
            loop,
            self._on_message,
            max_message=sip.max_message_size,
            max_connections=sip.max_tcp_connections,
            idle_timeout=sip.tcp_idle_timeout,
        )
        try:
            await self.transports.listen(self.settings.server.listen)
        except OSError as exc:
            log.error("listen_failed", error=str(exc))
            await self.transports.close()
            return 1
        watcher.start()
        loop.add_signal_handler(signal.SIGHUP, watcher.reload_requested.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        log.info("ready", listen=self.transports.bound, mode=self.settings.server.mode)
        if self.settings.server.mode == "proxy":
            log.warning(
                "proxy_mode_unavailable",
                detail="this release redirects every endpoint (302 to its pool)",
            )
        await self._stop.wait()

        log.info("draining", timeout=self.settings.server.drain_timeout)
        self.element.draining = True
        await self.transports.stop_accepting()
        deadline = loop.time() + self.settings.server.drain_timeout
        while self.element.in_flight() and loop.time() < deadline and self._signals < 2:
            await asyncio.sleep(0.05)
        watcher.stopped.set()
        watcher.reload_requested.set()
        await self.transports.close()
        if self._timer is not None:
            self._timer.cancel()
        log.info("stopped", in_flight=self.element.in_flight())
        return 0

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        log.info("signal", signal=sig.name, count=self._signals)
        self._stop.set()

    def _swap(self, snapshot: Snapshot, why: str) -> None:
        assert self.element is not None
        self.element.snapshot = snapshot
        log.info("table_loaded", endpoints=len(snapshot), generation=snapshot.generation, why=why)

    def _on_message(self, data: bytes, peer: Peer) -> None:
        element = self.element
        transports = self.transports
        assert element is not None and transports is not None
        loop = transports.loop
        try:
            actions = element.receive(data, peer, loop.time())
        except Exception:  # the core answers every input; a bug must not stop the service
            log.exception(
                "internal_error", peer="%s:%s:%d" % (peer.transport, peer.host, peer.port)
            )
            return
        for action in actions:
            transports.send(action)
        # the armed timer already covers every older deadline: only a timer
        # armed by this message can be due earlier
        at = element.earliest_armed()
        if at is not None and (self._timer_at is None or at < self._timer_at):
            self._arm(at)

    def _arm(self, at: float) -> None:
        assert self.transports is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.transports.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        element, transports = self.element, self.transports
        assert element is not None and transports is not None
        self._timer = self._timer_at = None
        for action in element.handle_timers(transports.loop.time()):
            transports.send(action)
        at = element.next_deadline()
        if at is not None:
            self._arm(at)


def serve(settings: Settings) -> int:
    """Run the daemon on uvloop until it is stopped; returns the exit status."""
    import uvloop

    return uvloop.run(Server(settings).run())
