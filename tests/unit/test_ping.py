"""``pcproxy ping``: OPTIONS over UDP and TLS, and one clear line on silence."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner, Result

from proxy.cli import EXIT_BAD_INPUT, EXIT_REFUSED, main
from tests.tlspeer import answer_once_over_tls, final_response


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="pcproxy")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server for 127.0.0.1 answering one OPTIONS; yields its port and CA file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    listener, thread = answer_once_over_tls(context)
    yield listener.getsockname()[1], ca_file
    thread.join(5)
    listener.close()


def test_ping_over_tls_checks_the_certificate_against_the_ca(
    tls_server: tuple[int, Path],
) -> None:
    port, ca_file = tls_server
    result = run("ping", "127.0.0.1:%d" % port, "--transport", "tls", "--ca", str(ca_file))
    assert result.exit_code == 0, result.stderr
    assert re.fullmatch(r"127\.0\.0\.1:\d+: 200 OK in \d+\.\d ms\n", result.stdout)


def test_ping_over_tls_refuses_an_unknown_ca(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    result = run("ping", "127.0.0.1:%d" % port, "--transport", "tls")
    assert result.exit_code == EXIT_REFUSED
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr or "certificate" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_ping_over_tls_insecure_skips_verification(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    result = run("ping", "127.0.0.1:%d" % port, "--transport", "tls", "--insecure")
    assert result.exit_code == 0, result.stderr


def test_ping_silence_is_one_line_and_exit_1() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        result = run("ping", "127.0.0.1:%d" % port, "--timeout", "0.2")
    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == "pcproxy: error: 127.0.0.1:%d: no answer within 0.2s\n" % port


def test_ping_udp_gets_the_status_of_the_answer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]

        def reply() -> None:
            data, peer = server.recvfrom(65535)
            server.sendto(final_response(data, "503 Service Unavailable"), peer)

        thread = threading.Thread(target=reply, daemon=True)
        thread.start()
        result = run("ping", "127.0.0.1:%d" % port)
        thread.join(5)
    assert result.exit_code == EXIT_REFUSED
    assert result.stdout.startswith("127.0.0.1:%d: 503 Service Unavailable in " % port)


def test_ping_tls_options_need_tls() -> None:
    result = run("ping", "127.0.0.1:5060", "--insecure")
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr == "pcproxy: error: --ca and --insecure need --transport tls\n"
