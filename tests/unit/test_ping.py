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


@pytest.mark.parametrize("option", [("--insecure",), ("--cert", "c.pem"), ("--key", "k.pem")])
def test_ping_tls_options_need_tls(option: tuple[str, ...]) -> None:
    result = run("ping", "127.0.0.1:5060", *option)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr == (
        "pcproxy: error: --ca, --insecure, --cert and --key need --transport tls\n"
    )


@pytest.fixture
def mutual_tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, trustme.CA]]:
    """A TLS server for 127.0.0.1 that demands a client certificate of its
    CA (as a listener with require_client_certificate does); yields its port,
    the CA file and the CA."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    listener, thread = answer_once_over_tls(context)
    yield listener.getsockname()[1], ca_file, ca
    thread.join(5)
    listener.close()


@pytest.mark.parametrize("one_file", [True, False])
def test_ping_presents_a_client_certificate_to_a_mutual_tls_listener(
    mutual_tls_server: tuple[int, Path, trustme.CA], tmp_path: Path, one_file: bool
) -> None:
    port, ca_file, ca = mutual_tls_server
    client = ca.issue_cert("pcproxy-health.contoso.com")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    if one_file:
        client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
        keys: tuple[str, ...] = ()
    else:
        client.cert_chain_pems[0].write_to_path(str(cert_file))
        client.private_key_pem.write_to_path(str(key_file))
        keys = ("--key", str(key_file))
    args = ("--transport", "tls", "--ca", str(ca_file), "--cert", str(cert_file), *keys)
    result = run("ping", "127.0.0.1:%d" % port, *args)
    assert result.exit_code == 0, result.stderr
    assert re.fullmatch(r"127\.0\.0\.1:\d+: 200 OK in \d+\.\d ms\n", result.stdout)


def test_ping_without_a_certificate_is_refused_by_a_mutual_tls_listener(
    mutual_tls_server: tuple[int, Path, trustme.CA],
) -> None:
    port, ca_file, _ = mutual_tls_server
    result = run("ping", "127.0.0.1:%d" % port, "--transport", "tls", "--ca", str(ca_file))
    assert result.exit_code == EXIT_REFUSED
    assert len(result.stderr.splitlines()) == 1


def test_ping_names_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pem"
    result = run("ping", "127.0.0.1:5061", "--transport", "tls", "--cert", str(missing))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.startswith("pcproxy: error: --cert '%s' cannot be used: " % missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result = run("ping", "127.0.0.1:5061", "--transport", "tls", "--cert", str(garbage))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.startswith(
        "pcproxy: error: --cert '%s' cannot be used: not a PEM certificate with its "
        "private key (" % garbage
    )
    result = run("ping", "127.0.0.1:5061", "--transport", "tls", "--key", str(garbage))
    assert result.stderr == "pcproxy: error: --key needs --cert\n"
