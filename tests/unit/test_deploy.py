"""The deployment files agree with the daemon: the container image and the
systemd unit (checked by systemd-analyze when it is installed)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
UNIT = ROOT / "config" / "pcproxy.service"


def instruction(name: str) -> str:
    """The last ``NAME ...`` instruction of the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    found = re.findall(r"(?m)^%s\s+(.*)$" % name, text)
    assert found, name
    return str(found[-1])


def test_the_image_exposes_what_the_container_config_listens_on() -> None:
    settings = load_settings(ROOT / "config" / "container.toml")
    exposed = set(instruction("EXPOSE").split())
    for spec in settings.server.listen:
        proto = "udp" if spec.transport == "udp" else "tcp"
        assert "%d/%s" % (spec.port, proto) in exposed
    assert "5061/tcp" in exposed  # the tls: listener, once a certificate is mounted
    assert settings.table.path == Path("/var/lib/pcproxy/pcproxy.db")
    assert settings.server.drain_timeout < 10  # docker stop's default grace period


def test_the_image_drains_on_sigterm_and_checks_health_with_ping() -> None:
    assert instruction("STOPSIGNAL") == "SIGTERM"
    health = instruction("HEALTHCHECK")
    command = re.search(r"CMD (\[.*\])", health)
    assert command is not None
    argv = json.loads(command.group(1))
    assert argv[:2] == ["pcproxy", "ping"]
    settings = load_settings(ROOT / "config" / "container.toml")
    port = int(argv[2].rsplit(":", 1)[1])
    assert any(s.transport == "udp" and s.port == port for s in settings.server.listen)
    assert instruction("USER") == "pcproxy"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_the_unit_is_notify_type_and_reloads_with_sighup() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["User"] == "pcproxy" and service["StateDirectory"] == "pcproxy"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert service["CapabilityBoundingSet"] == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # the unit names /opt/pcproxy; verify it against the pcproxy of this environment
    pcproxy = Path(sys.executable).parent / "pcproxy"
    text = UNIT.read_text().replace("/opt/pcproxy/bin/pcproxy", str(pcproxy))
    copy = tmp_path / "pcproxy.service"
    copy.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pcproxy.service" not in done.stderr, done.stderr
