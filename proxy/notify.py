"""Service manager notifications: systemd's ``sd_notify`` protocol.

A service started with ``Type=notify`` tells systemd its state by sending
datagrams of newline-separated ``KEY=VALUE`` assignments to the AF_UNIX socket
named in ``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name when it
starts with ``@``).  pcproxy sends ``READY=1`` once it listens,
``RELOADING=1`` with ``MONOTONIC_USEC`` and then ``READY=1`` around a SIGHUP
reload, ``STOPPING=1`` when it drains, and ``STATUS=`` lines saying what it
does.  Without ``$NOTIFY_SOCKET`` (not under systemd, in a container) every
call does nothing.

Why these few lines are written here instead of taken from a library: the
systemd project declares this datagram protocol the stable interface, to be
reimplemented rather than linked (sd_notify(3), "Standalone Implementations";
systemd's interface portability chart lists ``$NOTIFY_SOCKET`` as
reimplementable independently).  Of the Python packages, ``sdnotify`` has had
no release since 2017, ``systemd-python`` builds against the libsystemd
headers, and ``cysystemd`` is a compiled libsystemd binding whose wheels need
glibc 2.34 or later: each brings more, and more fragile, code than the
protocol itself.  Credentials (SCM_CREDENTIALS) are added by the kernel for
the sending process, so a plain ``sendto`` is the whole of it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("notify")


class Notifier:
    """Sends sd_notify state changes to ``$NOTIFY_SOCKET``, if there is one.

    A failed send is logged once and never raised: the service runs the same
    whether or not anyone listens.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None
        if name.startswith("@"):
            self.address = b"\0" + name[1:].encode()  # Linux abstract namespace
        elif name.startswith("/"):
            self.address = name
        else:
            self.address = None  # unset, or a vsock address pcproxy does not speak
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **state: str | int) -> bool:
        """Send one datagram ``KEY=VALUE\\n...`` (keys upper-cased); True if sent."""
        if self.address is None:
            return False
        text = "".join(
            "%s=%s\n" % (key.upper(), str(value).replace("\n", " ")) for key, value in state.items()
        )
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("notify_failed", socket=str(self.address), error=str(exc))
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1``: start-up or a reload is complete."""
        return self.send(ready=1, status=status)

    def reloading(self, status: str = "reloading configuration") -> bool:
        """``RELOADING=1`` with the CLOCK_MONOTONIC time the reload began, as
        ``Type=notify-reload`` requires; ``ready()`` must follow."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(reloading=1, monotonic_usec=usec, status=status)

    def stopping(self, status: str = "draining") -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.send(stopping=1, status=status)

    def status(self, status: str) -> bool:
        """A free-form ``STATUS=`` line, shown by ``systemctl status``."""
        return self.send(status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
