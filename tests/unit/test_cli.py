"""``pcproxy endpoint``: verbs, output, one-line errors and exit statuses."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import proxy.store
from proxy import __version__
from proxy.cli import EXIT_BAD_INPUT, EXIT_REFUSED, main

LYNC_EXPORT = (
    "\ufeff"
    "#TYPE Microsoft.Rtc.Management.ADConnect.Schema.OCSPersistentChatEndpoint\r\n"
    '"Identity","SipAddress","DisplayName","PersistentChatPoolFqdn","Enabled","Name"\r\n'
    '"CN={4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70},CN=Application Contacts,CN=RTC Service,'
    'CN=Services,CN=Configuration,DC=contoso,DC=com","sip:OCSChat@contoso.com",'
    '"Group Chat (legacy)","pcpool.contoso.com","True","{4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70}"\r\n'
    '"CN={9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e},CN=Application Contacts,CN=RTC Service,'
    'CN=Services,CN=Configuration,DC=fabrikam,DC=com","sip:ocschat@fabrikam.com",'
    '"","pcpool2.fabrikam.com","True","{9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e}"\r\n'
)

Run = Callable[..., Result]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "table.db"


@pytest.fixture
def run(db: Path) -> Run:
    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None) -> Result:
        return runner.invoke(
            main, list(args), input=input, env={"PCPROXY_DB": str(db)}, prog_name="pcproxy"
        )

    return invoke


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def one_line_error(result: Result, status: int) -> str:
    assert result.exit_code == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pcproxy: error: ")
    return lines[0]


def listed(run: Run, *args: str) -> list[dict[str, object]]:
    data = json.loads(ok(run("endpoint", "get", "--json", *args)).stdout)
    assert isinstance(data, list)
    return data


def exported(run: Run) -> str:
    return ok(run("endpoint", "export")).stdout


@pytest.fixture
def populated(run: Run) -> Run:
    for address, pool, name in [
        ("sip:ocschat@contoso.com", "pcpool.contoso.com", "Group Chat"),
        ("sip:chat2@contoso.com", "pcpool.contoso.com", "Contoso Archive"),
        ("sip:ocschat@fabrikam.com", "pcpool2.fabrikam.com", "Group Chat"),
        ("sip:legacy@litware.com", "pcpool2.fabrikam.com", ""),
    ]:
        ok(
            run(
                "endpoint",
                "new",
                "--sip-address",
                address,
                "--pool-fqdn",
                pool,
                "--display-name",
                name,
            )
        )
    return run


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"], prog_name="pcproxy")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_new_prints_the_created_endpoint(run: Run) -> None:
    result = ok(
        run(
            "endpoint",
            "new",
            "--sip-address",
            "sip:OCSChat@Contoso.com",
            "--pool-fqdn",
            "PCPool.contoso.com",
            "--display-name",
            "Group Chat",
            "--pool-port",
            "5041",
            "--pool-transport",
            "TLS",
        )
    )
    header, _, row = result.stdout.splitlines()
    assert header.split() == [
        "SipAddress",
        "PoolFqdn",
        "DisplayName",
        "Mode",
        "PoolPort",
        "PoolTransport",
        "Updated",
    ]
    assert row.split()[:7] == [
        "sip:OCSChat@contoso.com",
        "pcpool.contoso.com",
        "Group",
        "Chat",
        "inherit",
        "5041",
        "tls",
    ]
    (created,) = listed(run)
    assert created["key"] == "ocschat@contoso.com"
    assert created["mode"] is None
    assert created["pool_port"] == 5041


def test_duplicate_by_case_exits_1_naming_both_addresses(run: Run) -> None:
    args = ["endpoint", "new", "--pool-fqdn", "pcpool.contoso.com", "--sip-address"]
    ok(run(*args, "sip:OCSChat@Contoso.com"))
    line = one_line_error(run(*args, "sip:ocschat@contoso.com"), EXIT_REFUSED)
    assert line == (
        "pcproxy: error: --sip-address 'sip:ocschat@contoso.com' already exists"
        " (as sip:OCSChat@contoso.com)"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--sip-address", "ocschat@contoso.com"], "--sip-address 'ocschat@contoso.com' must"),
        (["--sip-address", "sip:oc chat@contoso.com"], "--sip-address 'sip:oc chat@contoso.com'"),
        (["--sip-address", "sip:ocschat@contoso"], "--sip-address 'sip:ocschat@contoso'"),
        (["--sip-address", "sip:ocschat@bad_domain.com"], "'sip:ocschat@bad_domain.com'"),
        (["--pool-fqdn", "pcpool"], "--pool-fqdn 'pcpool' is not fully qualified"),
        (["--pool-port", "0"], "--pool-port '0' is out of range"),
        (["--pool-port", "70000"], "--pool-port '70000' is out of range"),
        (["--pool-port", "fifty"], "--pool-port 'fifty' is not a port number"),
        (["--mode", "forward"], "--mode 'forward' is not one of redirect, proxy"),
        (["--pool-transport", "sctp"], "--pool-transport 'sctp' is not one of udp, tcp, tls"),
    ],
)
def test_new_with_a_bad_field_exits_2_naming_field_and_value(
    run: Run, db: Path, extra: list[str], expected: str
) -> None:
    args = {"--sip-address": "sip:ocschat@contoso.com", "--pool-fqdn": "pcpool.contoso.com"}
    args.update(zip(extra[::2], extra[1::2], strict=True))
    flat = [item for pair in args.items() for item in pair]
    line = one_line_error(run("endpoint", "new", *flat), EXIT_BAD_INPUT)
    assert expected in line
    assert listed(run) == []


def test_missing_or_unknown_options_are_one_line_usage_errors(run: Run) -> None:
    line = one_line_error(
        run("endpoint", "new", "--sip-address", "sip:a@contoso.com"), EXIT_BAD_INPUT
    )
    assert "'--pool-fqdn'" in line and "pcproxy endpoint new --help" in line
    line = one_line_error(run("endpoint", "get", "--bogus"), EXIT_BAD_INPUT)
    assert "--bogus" in line


def test_get_with_empty_table(run: Run) -> None:
    result = ok(run("endpoint", "get"))
    assert result.stdout == ""
    assert result.stderr.strip() == "no endpoints"
    assert ok(run("endpoint", "get", "--json")).stdout.strip() == "[]"


def test_get_unknown_identity_exits_1(populated: Run) -> None:
    line = one_line_error(populated("endpoint", "get", "sip:x@y.com"), EXIT_REFUSED)
    assert line == "pcproxy: error: identity 'sip:x@y.com' matches no endpoint"


def test_get_lists_all_as_a_table(populated: Run) -> None:
    lines = ok(populated("endpoint", "get")).stdout.splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].startswith("sip:chat2@contoso.com ")
    assert "Contoso Archive" in lines[2] and "inherit" in lines[2]


def test_get_json_has_stable_keys(populated: Run) -> None:
    data = listed(populated)
    assert [list(item) for item in data] == [
        [
            "sip_address",
            "key",
            "pool_fqdn",
            "display_name",
            "mode",
            "pool_port",
            "pool_transport",
            "created_at",
            "updated_at",
        ]
    ] * 4


def addresses(items: list[dict[str, object]]) -> list[object]:
    return [item["sip_address"] for item in items]


def test_get_by_identity_display_name_filter_pool_and_result_size(populated: Run) -> None:
    assert addresses(listed(populated, "SIP:Chat2@CONTOSO.com")) == ["sip:chat2@contoso.com"]
    assert addresses(listed(populated, "group chat")) == [
        "sip:ocschat@contoso.com",
        "sip:ocschat@fabrikam.com",
    ]
    assert addresses(listed(populated, "--filter", "*contoso*")) == [
        "sip:chat2@contoso.com",
        "sip:ocschat@contoso.com",
    ]
    assert addresses(listed(populated, "--pool-fqdn", "PCPOOL2.fabrikam.com")) == [
        "sip:legacy@litware.com",
        "sip:ocschat@fabrikam.com",
    ]
    assert addresses(listed(populated, "--result-size", "1")) == ["sip:chat2@contoso.com"]


def test_get_bad_result_size_exits_2(populated: Run) -> None:
    line = one_line_error(populated("endpoint", "get", "--result-size", "0"), EXIT_BAD_INPUT)
    assert "--result-size '0'" in line


def test_set_changes_only_given_fields(populated: Run) -> None:
    (before,) = listed(populated, "sip:chat2@contoso.com")
    ok(populated("endpoint", "set", "Contoso Archive", "--mode", "proxy", "--pool-port", "5041"))
    (after,) = listed(populated, "sip:chat2@contoso.com")
    assert after["mode"] == "proxy" and after["pool_port"] == 5041
    unchanged = {"sip_address", "key", "pool_fqdn", "display_name", "pool_transport", "created_at"}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert str(after["updated_at"]) >= str(before["updated_at"])


def test_set_clearing_words_go_back_to_not_set(populated: Run) -> None:
    ok(
        populated(
            "endpoint",
            "set",
            "sip:legacy@litware.com",
            "--mode",
            "redirect",
            "--pool-port",
            "5041",
            "--pool-transport",
            "tcp",
            "--display-name",
            "Legacy",
        )
    )
    ok(
        populated(
            "endpoint",
            "set",
            "sip:legacy@litware.com",
            "--mode",
            "inherit",
            "--pool-port",
            "none",
            "--pool-transport",
            "none",
            "--display-name",
            "",
        )
    )
    (item,) = listed(populated, "sip:legacy@litware.com")
    assert (item["mode"], item["pool_port"], item["pool_transport"], item["display_name"]) == (
        None,
        None,
        None,
        None,
    )


def test_set_needs_a_change(populated: Run) -> None:
    line = one_line_error(populated("endpoint", "set", "sip:legacy@litware.com"), EXIT_BAD_INPUT)
    assert "'sip:legacy@litware.com' is given nothing to change" in line


def test_set_ambiguous_display_name_asks_for_the_sip_address(populated: Run) -> None:
    line = one_line_error(
        populated("endpoint", "set", "Group Chat", "--mode", "proxy"), EXIT_BAD_INPUT
    )
    assert "identity 'Group Chat' matches 2 endpoints" in line and "SIP address" in line


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["sip:legacy@litware.com", "--mode", "proxy", "--pool-port", "70000"], EXIT_BAD_INPUT),
        (["sip:legacy@litware.com", "--pool-fqdn", "pcpool"], EXIT_BAD_INPUT),
        (["sip:nobody@litware.com", "--mode", "proxy"], EXIT_REFUSED),
    ],
)
def test_a_failed_set_leaves_the_table_unchanged(
    populated: Run, args: list[str], status: int
) -> None:
    before = exported(populated)
    one_line_error(populated("endpoint", "set", *args), status)
    assert exported(populated) == before


def test_remove_one(populated: Run) -> None:
    result = ok(populated("endpoint", "remove", "Contoso Archive"))
    assert result.stdout == "removed sip:chat2@contoso.com (pool pcpool.contoso.com)\n"
    assert "sip:chat2@contoso.com" not in addresses(listed(populated))
    one_line_error(populated("endpoint", "remove", "Contoso Archive"), EXIT_REFUSED)


def test_remove_by_pool(populated: Run) -> None:
    result = ok(populated("endpoint", "remove", "--pool-fqdn", "pcpool2.fabrikam.com"))
    assert result.stdout.splitlines() == [
        "removed sip:legacy@litware.com (pool pcpool2.fabrikam.com)",
        "removed sip:ocschat@fabrikam.com (pool pcpool2.fabrikam.com)",
    ]
    assert addresses(listed(populated)) == ["sip:chat2@contoso.com", "sip:ocschat@contoso.com"]


@pytest.mark.parametrize(
    "args", [[], ["sip:legacy@litware.com", "--pool-fqdn", "pcpool2.fabrikam.com"]]
)
def test_remove_needs_exactly_one_of_identity_or_pool(populated: Run, args: list[str]) -> None:
    before = exported(populated)
    line = one_line_error(populated("endpoint", "remove", *args), EXIT_BAD_INPUT)
    assert "IDENTITY or --pool-fqdn" in line
    assert exported(populated) == before


def test_import_lync_export_csv_file(run: Run, tmp_path: Path) -> None:
    sample = tmp_path / "endpoints.csv"
    sample.write_bytes(LYNC_EXPORT.encode("utf-8"))
    assert ok(run("endpoint", "import", str(sample))).stdout == "imported 2 endpoint(s)\n"
    assert exported(run) == (
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport\n"
        "sip:OCSChat@contoso.com,pcpool.contoso.com,Group Chat (legacy),,,\n"
        "sip:ocschat@fabrikam.com,pcpool2.fabrikam.com,,,,\n"
    )


def test_import_from_stdin(run: Run) -> None:
    ok(run("endpoint", "import", "-", input=LYNC_EXPORT.encode("utf-8")))
    assert len(listed(run)) == 2


def test_import_with_a_bad_row_on_line_3_leaves_the_table_as_it_was(
    populated: Run, tmp_path: Path
) -> None:
    before = exported(populated)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport\n"
        "sip:new1@contoso.com,pcpool.contoso.com,,,,\n"
        "sip:new2@contoso.com,pcpool.contoso.com,,,99999,\n"
        "sip:new3@contoso.com,pcpool.contoso.com,,,,\n"
    )
    for extra in ([], ["--replace"]):
        line = one_line_error(populated("endpoint", "import", str(bad), *extra), EXIT_BAD_INPUT)
        assert "%s line 3 PoolPort '99999'" % bad in line
        assert exported(populated) == before


def test_import_duplicate_of_the_table_exits_1_and_changes_nothing(populated: Run) -> None:
    before = exported(populated)
    data = (
        "SipAddress,PersistentChatPoolFqdn\n"
        "sip:new@contoso.com,p.contoso.com\n"
        "sip:OCSCHAT@contoso.com,p.contoso.com\n"
    )
    line = one_line_error(populated("endpoint", "import", "-", input=data), EXIT_REFUSED)
    assert "<stdin> line 3 SipAddress 'sip:OCSCHAT@contoso.com' already exists" in line
    assert exported(populated) == before


def test_import_missing_file_exits_2(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    line = one_line_error(run("endpoint", "import", str(missing)), EXIT_BAD_INPUT)
    assert str(missing) in line


def test_export_import_round_trip_and_replace(populated: Run, tmp_path: Path) -> None:
    ok(
        populated(
            "endpoint",
            "set",
            "sip:legacy@litware.com",
            "--mode",
            "proxy",
            "--pool-port",
            "5041",
            "--pool-transport",
            "tls",
        )
    )
    text = exported(populated)
    copy_db = tmp_path / "copy.db"
    result = CliRunner().invoke(main, ["endpoint", "import", "--db", str(copy_db), "-"], input=text)
    assert result.exit_code == 0, result.stderr
    result = CliRunner().invoke(main, ["endpoint", "export", "--db", str(copy_db)])
    assert result.stdout == text
    ok(populated("endpoint", "remove", "sip:chat2@contoso.com"))
    ok(
        populated(
            "endpoint",
            "new",
            "--sip-address",
            "sip:extra@contoso.com",
            "--pool-fqdn",
            "pcpool.contoso.com",
        )
    )
    assert ok(populated("endpoint", "import", "--replace", "-", input=text)).stdout == (
        "imported 4 endpoint(s) (table replaced)\n"
    )
    assert exported(populated) == text


def test_config_file_table_path_is_used_and_db_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "pcproxy.toml"
    from_config = tmp_path / "from-config.db"
    config.write_text('[table]\npath = "%s"\n' % from_config)
    runner = CliRunner()
    new = ["endpoint", "new", "--sip-address", "sip:a@contoso.com", "--pool-fqdn", "p.contoso.com"]
    assert runner.invoke(main, [*new, "--config", str(config)]).exit_code == 0
    assert from_config.exists()
    override = tmp_path / "override.db"
    result = runner.invoke(main, [*new, "--config", str(config), "--db", str(override)])
    assert result.exit_code == 0
    assert override.exists()


def test_bad_config_exits_2_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[table]\npoll_interval = -1\n")
    result = CliRunner().invoke(main, ["endpoint", "get", "--config", str(config)])
    line = one_line_error(result, EXIT_BAD_INPUT)
    assert str(config) in line and "poll_interval" in line


def test_missing_database_directory_exits_1_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "t.db"
    result = CliRunner().invoke(main, ["endpoint", "get", "--db", str(path)])
    line = one_line_error(result, EXIT_REFUSED)
    assert repr(str(path)) in line


def test_locked_database_is_one_line_and_exit_1(
    populated: Run, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy.store, "DEFAULT_BUSY_TIMEOUT", 0.05)
    before = exported(populated)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        result = populated(
            "endpoint", "new", "--sip-address", "sip:x@contoso.com", "--pool-fqdn", "p.contoso.com"
        )
        line = one_line_error(result, EXIT_REFUSED)
        assert "is locked" in line and str(db) in line
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert exported(populated) == before


def test_not_a_database_is_one_line(run: Run, db: Path) -> None:
    db.write_bytes(b"not sqlite at all " * 200)
    line = one_line_error(run("endpoint", "get"), EXIT_REFUSED)
    assert str(db) in line


@pytest.mark.parametrize(
    ("verb", "cmdlet"),
    [
        ("new", "New-CsPersistentChatEndpoint"),
        ("get", "Get-CsPersistentChatEndpoint"),
        ("remove", "Remove-CsPersistentChatEndpoint"),
        ("import", "Export-Csv"),
        ("set", "inherit"),
    ],
)
def test_help_names_the_lync_cmdlet(verb: str, cmdlet: str) -> None:
    result = CliRunner().invoke(main, ["endpoint", verb, "--help"], prog_name="pcproxy")
    assert result.exit_code == 0
    assert cmdlet in result.stdout
    assert "--config" in result.stdout and "PCPROXY_DB" in result.stdout


def test_serve_metrics_option_is_checked_before_anything_starts(run: Run) -> None:
    line = one_line_error(run("serve", "--metrics", "localhost:9060"), EXIT_BAD_INPUT)
    assert line.startswith("pcproxy: error: --metrics ") and "localhost" in line
