"""The daemon: wiring, lifecycle and signals around the pure element.

The shell is thin.  It hands every received message to ``Element.receive``
with the loop's clock, sends what comes back, and arms one timer for the
element's next deadline.  The endpoint table is watched from a thread (SQLite
``PRAGMA data_version``, RFC-free but cheap): a new snapshot is loaded and
validated there, off the loop, and swapped in by rebinding one reference.
A table that fails to load leaves the previous snapshot in service.

Signals: SIGHUP re-reads the configuration file and applies what can change
at run time (``proxy.reload``: the table, TLS certificates, the log level and
every hook in ``Server.reload_hooks``), logging what needs a restart;
SIGTERM/SIGINT stop accepting (new requests get 503 with Retry-After), let
in-flight transactions finish within ``server.drain_timeout`` and exit 0; a
second SIGTERM/SIGINT exits at once.  Under systemd each step is announced
through ``proxy.notify`` (READY, RELOADING, STOPPING, STATUS).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from proxy import reload, tls
from proxy.admission import ADMITTED, Admission, Refused
from proxy.config import Settings
from proxy.element import Element, ElementConfig, Listener, Note, Output, Resolve
from proxy.log import configure as configure_logging
from proxy.metrics import MetricsServer
from proxy.notify import Notifier
from proxy.reload import ReloadHook
from proxy.resolve import ResolveError, Resolver
from proxy.sip.peer import Peer, Send
from proxy.sip.transaction import Timers
from proxy.store import EndpointStore, Snapshot
from proxy.transport import Transports

if TYPE_CHECKING:
    from proxy.workers import WorkerPlan

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


def read_secret(path: Path | None) -> bytes:
    """The key of Record-Route tokens and loop-detection hashes: from
    ``[proxy] secret_file`` (so dialogs outlive a restart and workers agree),
    else random for this run."""
    if path is None:
        return os.urandom(32)
    data = path.read_bytes().strip()
    if len(data) < 16:
        raise ValueError("%s: a secret needs at least 16 bytes" % path)
    return data


class Server:
    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        worker: WorkerPlan | None = None,
    ) -> None:
        #: The settings in effect: those of the start, with what reloads applied.
        self.settings = settings
        #: Reads the configuration again (file and command-line overrides); SIGHUP.
        self.load: Callable[[], Settings] = load or (lambda: settings)
        #: One worker of several (``proxy.workers``), or None: the only process.
        self.worker = worker
        #: systemd hears from the main process: the supervisor, when there are workers.
        self.notifier = notifier or (Notifier({}) if worker is not None else Notifier())
        #: What SIGHUP applies, in order; a hook for run-time settings of its
        #: own is appended here before ``run()`` (see ``proxy.reload``).
        self.reload_hooks: list[ReloadHook] = [
            ReloadHook("log", ("log.level",), lambda s: configure_logging(s.log.level)),
            ReloadHook("tls", TLS_RUNTIME_KEYS, self._reload_tls),
            ReloadHook("table", ("table.poll_interval",), self._reload_table),
            ReloadHook("security", ("security", "tls.allowed_peers"), self.reconfigure_security),
            # read from self.settings when the drain starts
            ReloadHook("drain_timeout", ("server.drain_timeout",), lambda s: None),
        ]
        self._watcher: TableWatcher | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        sip, proxy = settings.sip, settings.proxy
        self.element_config = ElementConfig(
            default_mode=settings.server.mode,
            server_name=settings.server.server_name,
            timers=Timers(sip.t1, sip.t2, sip.t4),
            max_message_size=sip.max_message_size,
            max_headers=sip.max_headers,
            record_route=proxy.record_route,
            target_timeout=proxy.target_timeout,
            retry_after=proxy.retry_after,
            secret=worker.secret if worker is not None else read_secret(proxy.secret_file),
        )
        self.resolver = Resolver.from_settings(settings)
        #: The trust boundary; ``admission.configure(settings)`` swaps its
        #: networks, names and limits at run time.
        self.admission = Admission(settings)
        self.element: Element | None = None
        self.transports: Transports | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_ssl: ssl.SSLContext | None = None
        self.server_contexts: tls.ServerContexts | None = None
        #: Table loaded and SIP listeners bound (``/readyz``).
        self.ready = False
        self.metrics: MetricsServer | None = None

    def _client_context(self) -> ssl.SSLContext:
        if self._client_ssl is None:
            self._client_ssl = tls.client_context(self.settings.tls)
        return self._client_ssl

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        metrics_at = self.settings.metrics.endpoint()
        if metrics_at is not None:
            host, port = metrics_at
            if self.worker is not None and port:
                port += self.worker.index  # worker i of several: PORT + i
            self.metrics = MetricsServer(self)
            try:
                await self.metrics.start(host, port)
            except OSError as exc:
                log.error("listen_failed", error=str(exc))
                return 1
        try:
            return await self._run(loop)
        finally:
            if self.metrics is not None:
                await self.metrics.close()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
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
        try:
            if any(spec.transport == "tls" for spec in self.settings.server.listen):
                self.server_contexts = tls.ServerContexts(self.settings.tls)
            self._client_context()
        except tls.TlsConfigError as exc:
            log.error("tls_config_failed", error=str(exc))
            return 1
        self.transports = Transports(
            loop,
            self._on_message,
            max_message=sip.max_message_size,
            max_connections=sip.max_tcp_connections,
            max_connections_per_source=self.settings.security.max_connections_per_source,
            idle_timeout=sip.tcp_idle_timeout,
            on_failed=lambda peer: loop.call_soon(self._on_failed, peer),
            server_ssl=self.server_contexts.base_context if self.server_contexts else None,
            client_ssl=self._client_context,
        )
        worker = self.worker
        try:
            await self.transports.listen(self.settings.server.listen, reuse_port=worker is not None)
            if worker is not None:  # this worker's own ports, toward pools
                await self.transports.listen(worker.pool_side, sockets=worker.sockets)
        except OSError as exc:
            log.error("listen_failed", error=str(exc))
            await self.transports.close()
            return 1
        shared = len(self.settings.server.listen)
        self.element.set_listeners(
            [Listener(*spec, i >= shared) for i, spec in enumerate(self.transports.listeners)],
            worker.pool_addresses if worker is not None else (),
        )
        self._watcher = watcher
        watcher.start()
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        self.ready = True
        log.info("ready", listen=self.transports.bound, mode=self.settings.server.mode)
        self.notifier.ready(self._status())
        if worker is not None:
            worker.ready()
        await self._stop.wait()

        log.info("draining", timeout=self.settings.server.drain_timeout)
        self.notifier.stopping("draining: %d transactions in flight" % self.element.in_flight())
        self.element.draining = True
        await self.transports.stop_accepting()
        deadline = loop.time() + self.settings.server.drain_timeout
        while self.element.in_flight() and loop.time() < deadline and self._signals < 2:
            await asyncio.sleep(0.05)
        watcher.stopped.set()
        watcher.reload_requested.set()
        for task in list(self._tasks):
            task.cancel()
        await self.transports.close()
        if self._timer is not None:
            self._timer.cancel()
        log.info(
            "stopped", in_flight=self.element.in_flight(), counters=dict(self.element.counters)
        )
        self.notifier.close()
        return 0

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        log.info("signal", signal=sig.name, count=self._signals)
        self._stop.set()

    def _status(self) -> str:
        assert self.element is not None and self.transports is not None
        return "serving %d endpoints on %s" % (
            len(self.element.snapshot),
            ", ".join(self.transports.bound),
        )

    def _on_reload_signal(self) -> None:
        """SIGHUP: one reload at a time; a signal during one asks for another."""
        log.info("signal", signal="SIGHUP")
        if self._stop.is_set():
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(self._reload_task)
        self._reload_task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        """Re-read the configuration off the loop, apply it, log one line."""
        while True:
            self._reload_again = False
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(self.load)
            except Exception as exc:  # ConfigError names the field; keep running as is
                log.error("reload_failed", error=str(exc))
                self.notifier.ready("reload failed, previous configuration kept: %s" % exc)
            else:
                report = reload.apply(self.settings, new, self.reload_hooks)
                self.settings = report.settings
                (log.warning if report.failed or report.restart else log.info)(
                    "reloaded",
                    applied=report.applied,
                    failed=report.failed,
                    changed=report.changed,
                    restart_required=report.restart,
                )
                status = self._status()
                if report.failed:
                    status += "; reload failed for %s" % ", ".join(report.failed)
                if report.restart:
                    status += "; restart needed for %s" % ", ".join(report.restart)
                self.notifier.ready(status)
            if not self._reload_again or self._stop.is_set():
                return

    def _reload_tls(self, settings: Settings) -> None:
        """New certificates for new connections, listeners and pool alike;
        nothing changes unless both contexts can be built."""
        client = tls.client_context(settings.tls)
        if self.server_contexts is not None:
            self.server_contexts.reload(settings.tls)
        self._client_ssl = client

    def _reload_table(self, settings: Settings) -> None:
        if self._watcher is not None:
            self._watcher.interval = settings.table.poll_interval
            self._watcher.reload_requested.set()

    def _swap(self, snapshot: Snapshot, why: str) -> None:
        assert self.element is not None
        self.element.snapshot = snapshot
        log.info("table_loaded", endpoints=len(snapshot), generation=snapshot.generation, why=why)

    def reconfigure_security(self, settings: Settings) -> None:
        """Apply reloaded ``[security]`` and ``[tls] allowed_peers`` (SIGHUP):
        networks, names and rates at once; the per-source connection bound
        from the next accepted connection on."""
        self.admission.configure(settings)
        if self.transports is not None:
            limit = settings.security.max_connections_per_source
            self.transports.max_connections_per_source = limit

    def _on_message(self, data: bytes, peer: Peer) -> None:
        element = self.element
        transports = self.transports
        assert element is not None and transports is not None
        now = transports.loop.time()
        names: tuple[str, ...] | None = None
        if peer.conn:
            conn = transports.connections.get(peer.conn)
            # a connection pcproxy opened itself, to a pool server, is trusted
            outbound = conn is not None and conn.target is not None
            names = conn.peer_names if conn is not None else None
        else:
            outbound = False
        verdict = (
            ADMITTED
            if outbound
            else self.admission.check(data, peer.host, now, stream=peer.reliable, names=names)
        )
        actions: Sequence[Output]
        try:
            if verdict is ADMITTED:
                actions = element.receive(data, peer, now)
            elif type(verdict) is Refused:  # answered, never forwarded
                actions = element.refuse(
                    data, peer, verdict.status, verdict.reason, now, retry_after=verdict.retry_after
                )
            else:
                return  # dropped, counted in admission.counters
        except Exception:  # the core answers every input; a bug must not stop the service
            log.exception(
                "internal_error", peer="%s:%s:%d" % (peer.transport, peer.host, peer.port)
            )
            return
        self._dispatch(actions)

    def _dispatch(self, actions: Sequence[Output]) -> None:
        """Carry out the core's actions, then arm the timer if a new one is earlier."""
        transports = self.transports
        assert transports is not None
        for action in actions:
            if type(action) is Send:
                transports.send(action)
            elif type(action) is Resolve:
                self._resolve(action)
            elif type(action) is Note:
                log.warning(action.event, **dict(action.fields))
            else:
                self.resolver.mark_failed(action.target)  # type: ignore[union-attr]
        # the armed timer already covers every older deadline: only a timer
        # armed by these actions can be due earlier
        at = self.element.earliest_armed() if self.element is not None else None
        if at is not None and (self._timer_at is None or at < self._timer_at):
            self._arm(at)

    def _resolve(self, action: Resolve) -> None:
        """The RFC 3263 plan: from the cache at once, else in a task."""
        element = self.element
        assert element is not None and self.transports is not None
        plan = self.resolver.plan_cached(action.host, port=action.port, transport=action.transport)
        if plan is not None:
            self._dispatch(element.targets_ready(action.ref, plan, self.transports.loop.time()))
            return
        task = self.transports.loop.create_task(self._resolve_async(action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_async(self, action: Resolve) -> None:
        element = self.element
        assert element is not None and self.transports is not None
        try:
            plan = await self.resolver.plan(
                action.host, port=action.port, transport=action.transport
            )
        except ResolveError as exc:  # the element notes it, with the request's Call-ID
            actions = element.resolve_failed(action.ref, exc.reason, self.transports.loop.time())
        except Exception:
            log.exception("internal_error", host=action.host)
            actions = element.resolve_failed(
                action.ref, "internal error", self.transports.loop.time()
            )
        else:
            actions = element.targets_ready(action.ref, plan, self.transports.loop.time())
        self._dispatch(actions)

    def _on_failed(self, peer: Peer) -> None:
        """A connection to ``peer`` could not be opened or is gone (§17.1.4)."""
        element = self.element
        if element is None or self.transports is None:
            return
        try:
            actions = element.transport_failed(peer, self.transports.loop.time())
        except Exception:
            log.exception(
                "internal_error", peer="%s:%s:%d" % (peer.transport, peer.host, peer.port)
            )
            return
        self._dispatch(actions)

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
        try:
            actions = element.handle_timers(transports.loop.time())
        except Exception:
            log.exception("internal_error", where="timers")
            actions = []
        self._dispatch(actions)
        at = element.next_deadline()
        if at is not None:
            self._arm(at)


#: Allocations between young collections.  A proxied call allocates a few
#: thousand short-lived objects that reference counting frees; the default
#: (700) made the cyclic collector run several times per call.
GC_THRESHOLD = (50_000, 20, 100)


#: The ``[tls]`` keys a reload applies; ``require_client_certificate`` and
#: ``min_version`` are fixed in the listeners' base context until a restart.
TLS_RUNTIME_KEYS = (
    "tls.certificate",
    "tls.private_key",
    "tls.ca_bundle",
    "tls.verify_server",
    "tls.allowed_peers",
)


def serve(
    settings: Settings,
    load: Callable[[], Settings] | None = None,
    worker: WorkerPlan | None = None,
) -> int:
    """Run the daemon (or one ``worker`` of it) on uvloop until it is stopped;
    returns the exit status.

    ``load`` reads the configuration again on SIGHUP (default: ``settings``)."""
    import uvloop

    # what start-up built (modules, config, the first snapshot) lives as long
    # as the process: keep it out of every later collection
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    return uvloop.run(Server(settings, load, worker=worker).run())
