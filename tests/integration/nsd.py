"""NSD, a real authoritative DNS server, serving a zone on a loopback port.

NSD (Debian ``nsd``, installed by scripts/test) reads a real zone file, so the
SRV, A and AAAA records the tests resolve are written the way an operator
writes them.  Each server listens on 127.0.0.1 and a port chosen at run time,
serves the zone ``pcproxy.test`` from ``zonedir/pcproxy.test.zone`` (the
static one in tests/integration/dns/ by default, or one a test renders from a
template with ``render_zone``), and is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from .conftest import free_port

ZONE_DIR = Path(__file__).parent / "dns"
ZONE_FILE = "pcproxy.test.zone"
NSD = shutil.which("nsd") or "/usr/sbin/nsd"


@dataclass
class DnsServer:
    proc: subprocess.Popen[bytes]
    port: int
    rundir: Path

    @property
    def nameserver(self) -> str:
        """What ``pcproxy serve --nameserver`` takes."""
        return "127.0.0.1:%d" % self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log(self) -> str:
        path = self.rundir / "nsd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nsd(rundir: Path, zonedir: Path = ZONE_DIR) -> DnsServer:
    """NSD serving ``zonedir/pcproxy.test.zone``, answering before this returns."""
    assert os.path.exists(NSD), (
        "nsd is not installed: scripts/test installs it (apt-get install nsd)"
    )
    port = free_port()
    rundir.mkdir(parents=True, exist_ok=True)
    conf = rundir / "nsd.conf"
    template = string.Template((ZONE_DIR / "nsd.conf.in").read_text())
    conf.write_text(
        template.substitute(address="127.0.0.1", port=port, rundir=rundir, zonedir=zonedir)
    )
    proc = subprocess.Popen(
        [NSD, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = DnsServer(proc, port, rundir)
    query = dns.message.make_query("ns.pcproxy.test", "A")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("nsd exited with %s: %s" % (proc.returncode, server.log()))
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            return server
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    server.stop()
    raise AssertionError("nsd did not answer within 10 s: %s" % server.log())


_PLACEHOLDER = re.compile(r"@([A-Z0-9_]+)@")


def render_zone(template: str, zonedir: Path, values: Mapping[str, object]) -> Path:
    """Write ``zonedir/pcproxy.test.zone`` from ``dns/<template>``, each
    ``@NAME@`` replaced by ``values[NAME]`` (ports chosen at run time).  A
    placeholder without a value is an error, not an empty field."""
    text = (ZONE_DIR / template).read_text()
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    assert not missing, "zone template %s: no value for %s" % (template, ", ".join(missing))
    zonedir.mkdir(parents=True, exist_ok=True)
    path = zonedir / ZONE_FILE
    path.write_text(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text))
    return path
