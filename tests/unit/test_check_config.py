"""``pcproxy check-config``: every kind of problem named precisely, exit statuses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner, Result

from proxy.checkconfig import check_config
from proxy.cli import EXIT_BAD_INPUT, main
from proxy.store import SCHEMA_VERSION, EndpointStore

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pcproxy.toml"
POOL = "pcpool.contoso.com"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="pcproxy")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pcproxy.toml"
    path.write_text("[table]\npath = '%s'\n%s" % (tmp_path / "table.db", text))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The error lines, each checked to be one self-contained line."""
    path = write(tmp_path, text)
    result = run("check-config", "--config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    prefix = "pcproxy: error: %s: " % path
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(prefix) for line in lines), result.stderr
    return [line.removeprefix(prefix) for line in lines]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    files = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name in ("one", "two"):
        leaf = ca.issue_cert(POOL)
        files[name + ".crt"] = directory / (name + ".crt")
        files[name + ".key"] = directory / (name + ".key")
        leaf.cert_chain_pems[0].write_to_path(str(files[name + ".crt"]))
        leaf.private_key_pem.write_to_path(str(files[name + ".key"]))
    return files


# valid ----------------------------------------------------------------------------------
def test_valid_config_prints_a_summary_and_exits_0(tmp_path: Path) -> None:
    with EndpointStore(tmp_path / "table.db") as store:
        store.new("sip:ocschat@contoso.com", POOL)
        store.new("sip:ocschat@fabrikam.com", POOL)
    path = write(
        tmp_path,
        '[server]\nlisten = ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]\nmode = "redirect"\n'
        '[dns]\nnameservers = ["127.0.0.1:5353"]\n',
    )
    result = run("check-config", "--config", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "%s: valid" % path,
        "listeners: udp:127.0.0.1:5060, tcp:127.0.0.1:5060",
        "mode:      redirect",
        "table:     %s (schema %d, 2 endpoint(s))" % (tmp_path / "table.db", SCHEMA_VERSION),
        "dns:       127.0.0.1:5353",
        "tls:       no certificate",
    ]


def test_defaults_without_config_are_valid_and_no_table_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("check-config")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("defaults: valid\n")
    assert "table:     %s (not created yet" % (tmp_path / "pcproxy.db") in result.stdout
    assert not (tmp_path / "pcproxy.db").exists()


def test_the_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run("check-config", "--config", str(EXAMPLE)).exit_code == 0


def test_valid_tls_material_passes(tmp_path: Path, pki: dict[str, Path]) -> None:
    report = check_config(
        write(
            tmp_path,
            '[server]\nlisten = ["tls:127.0.0.1:5061"]\n[tls]\ncertificate = "%s"\n'
            'private_key = "%s"\nca_bundle = "%s"\n' % (pki["one.crt"], pki["one.key"], pki["ca"]),
        )
    )
    assert report.problems == []


# pydantic's checks, named ---------------------------------------------------------------
def test_unknown_key_is_named_with_the_keys_that_exist(tmp_path: Path) -> None:
    assert problems(tmp_path, "[server]\nlisen = ['udp:127.0.0.1:5060']\n") == [
        "server.lisen: unknown key (known keys: drain_timeout, listen, mode, server_name, workers)"
    ]


def test_unknown_section_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, "[sever]\nmode = 'proxy'\n") == [
        "sever: unknown section (known sections: [server], [table], [log], [sip], [proxy],"
        " [dns], [tls], [security], [metrics])"
    ]


def test_bad_values_name_the_field_path_and_the_value(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "[server]\nlisten = ['udp:127.0.0.1:5060', 'udp:127.0.0.1:99999']\nmode = 'bogus'\n"
        "[sip]\nt1 = -1\n[dns]\nnameservers = ['dns.example.com']\n",
    )
    assert found == [
        "server.listen[1]: 'udp:127.0.0.1:99999': port must be 0-65535, got '99999'",
        "server.mode: Input should be 'redirect' or 'proxy', got 'bogus'",
        "sip.t1: Input should be greater than 0, got -1",
        "dns.nameservers: 'dns.example.com': nameserver must be an IP address,"
        " got 'dns.example.com'",
    ]


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    [line] = problems(tmp_path, "[server\n")
    assert line.startswith("(file): not valid TOML: ") and "line 3" in line


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run("check-config", "--config", str(missing))
    assert result.exit_code == EXIT_BAD_INPUT
    assert (
        result.stderr
        == "pcproxy: error: %s: (file): cannot read: No such file or directory\n" % (missing)
    )


# beyond pydantic ------------------------------------------------------------------------
def test_listen_addresses_on_one_socket_are_named(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "[server]\nlisten = ['udp:127.0.0.1:5060', 'tcp:127.0.0.1:5060', 'tls:127.0.0.1:5060',"
        " 'udp:[::1]:5070', 'udp:[0:0::1]:5070', 'tcp:127.0.0.1:0', 'tcp:127.0.0.1:0']\n",
    )
    assert found == [
        "server.listen[2]: 'tls:127.0.0.1:5060' takes the same TCP socket as server.listen[1]"
        " 'tcp:127.0.0.1:5060'",
        "server.listen[4]: 'udp:[0:0::1]:5070' takes the same UDP socket as server.listen[3]"
        " 'udp:[::1]:5070'",
        "tls.certificate: a TLS listener needs a certificate and private_key",
    ]


def test_missing_certificate_file_is_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    assert problems(
        tmp_path,
        "[tls]\ncertificate = '%s'\nprivate_key = '%s'\n" % (tmp_path / "no.crt", pki["one.key"]),
    ) == ["tls.certificate: %s: file not found" % (tmp_path / "no.crt")]


def test_key_of_another_certificate_is_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    assert problems(
        tmp_path,
        "[tls]\ncertificate = '%s'\nprivate_key = '%s'\n" % (pki["one.crt"], pki["two.key"]),
    ) == [
        "tls.private_key: %s does not match the certificate in %s"
        % (pki["two.key"], pki["one.crt"])
    ]


def test_ca_bundle_that_does_not_parse_is_named(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    [line] = problems(tmp_path, "[tls]\nca_bundle = '%s'\n" % bundle)
    assert line.startswith("tls.ca_bundle: %s: no PEM certificate could be read" % bundle)


def test_table_directory_that_does_not_exist_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.write_text("[table]\npath = '%s'\n" % (tmp_path / "no" / "t.db"))
    result = run("check-config", "--config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines() == [
        "pcproxy: error: %s: table.path: '%s': no directory %s"
        % (path, tmp_path / "no" / "t.db", tmp_path / "no")
    ]


def test_table_of_a_newer_schema_is_named(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "table.db") as db:
        db.execute("PRAGMA user_version = %d" % (SCHEMA_VERSION + 1))
    assert problems(tmp_path, "") == [
        "table.path: '%s' has schema version %d, newer than this pcproxy knows (%d)"
        % (tmp_path / "table.db", SCHEMA_VERSION + 1, SCHEMA_VERSION)
    ]


def test_foreign_sqlite_file_and_non_database_are_named(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "table.db") as db:
        db.execute("CREATE TABLE other (x)")
    assert problems(tmp_path, "") == [
        "table.path: '%s' is an SQLite file but not a pcproxy table" % (tmp_path / "table.db")
    ]
    (tmp_path / "table.db").write_bytes(b"x" * 4096)
    [line] = problems(tmp_path, "")
    assert line.startswith("table.path: '%s' cannot be read: " % (tmp_path / "table.db"))
    assert "not a database" in line


def test_secret_file_missing_or_short_is_named(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    assert problems(tmp_path, "[proxy]\nsecret_file = '%s'\n" % secret) == [
        "proxy.secret_file: '%s' cannot be read: No such file or directory" % secret
    ]
    secret.write_bytes(b"short\n")
    assert problems(tmp_path, "[proxy]\nsecret_file = '%s'\n" % secret) == [
        "proxy.secret_file: '%s' holds 5 bytes; a secret needs at least 16" % secret
    ]
    secret.write_bytes(b"0123456789abcdef0123")
    assert check_config(write(tmp_path, "[proxy]\nsecret_file = '%s'\n" % secret)).valid


def test_every_section_is_checked_in_one_run(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "[server]\nmode = 'bogus'\n[proxy]\nsecret_file = '%s'\n[tls]\nca_bundle = '%s'\n"
        % (tmp_path / "secret", tmp_path / "ca.pem"),
    )
    assert [line.partition(":")[0] for line in found] == [
        "server.mode",
        "tls.ca_bundle",
        "proxy.secret_file",
    ]
