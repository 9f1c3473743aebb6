"""``pcproxy explain`` without a network: the decision, the mode's reason, the
health of probed targets, and the CLI's exit statuses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import MappingProxyType

import pytest
from click.testing import CliRunner, Result

from proxy import explain
from proxy.cli import EXIT_BAD_INPUT, EXIT_REFUSED, main
from proxy.config import Settings
from proxy.resolve import Target
from proxy.store import Endpoint, EndpointStore, Snapshot
from proxy.transport.ping import PingResult

POOL = "pcpool.contoso.com"


def endpoint(key: str, **fields: object) -> Endpoint:
    values: dict[str, object] = {
        "sip_address": "sip:%s" % key,
        "key": key,
        "pool_fqdn": POOL,
        "display_name": None,
        "mode": None,
        "pool_port": None,
        "pool_transport": None,
        "created_at": "2026-11-22T00:00:00Z",
        "updated_at": "2026-11-22T00:00:00Z",
    }
    values.update(fields)
    return Endpoint(**values)  # type: ignore[arg-type]


SNAPSHOT = Snapshot(
    MappingProxyType(
        {
            "ocschat@contoso.com": endpoint("ocschat@contoso.com"),
            "chat@contoso.com": endpoint(
                "chat@contoso.com", mode="redirect", pool_port=5061, pool_transport="tcp"
            ),
        }
    ),
    1,
)


def test_match_is_the_daemons_user_at_host_comparison() -> None:
    found = explain.decide(
        SNAPSHOT, "sip:OCS%43hat@Contoso.COM:5070;transport=tcp", Settings(), None
    )
    assert found.endpoint is not None and found.key == "ocschat@contoso.com"


def test_inherited_mode_names_the_config_file_or_the_built_in_default() -> None:
    from_file = explain.decide(SNAPSHOT, "sip:ocschat@contoso.com", Settings(), Path("x.toml"))
    assert (from_file.mode, from_file.mode_reason) == (
        "proxy",
        "the endpoint inherits [server] mode = proxy in x.toml",
    )
    builtin = explain.decide(SNAPSHOT, "sip:ocschat@contoso.com", Settings(), None)
    assert builtin.mode_reason.endswith("(built-in default)")
    assert "SRV _sips._tcp, _sip._tcp, _sip._udp" in (builtin.lookup or "")


def test_endpoint_mode_and_port_are_the_reason_and_the_lookup() -> None:
    found = explain.decide(SNAPSHOT, "sip:chat@contoso.com", Settings(), None)
    assert (found.mode, found.mode_reason) == ("redirect", "the endpoint sets mode redirect")
    assert found.answer == (
        "302 Moved Temporarily, Contact: <sip:chat@pcpool.contoso.com:5061;transport=tcp>"
    )
    assert found.lookup == "the endpoint names port 5061: A/AAAA of %s, no SRV (RFC 3263 §4.2)" % (
        POOL
    )
    assert any("redirect mode" in note for note in found.notes)


def test_unknown_uri_is_404() -> None:
    missing = explain.decide(SNAPSHOT, "sip:nobody@contoso.com", Settings(), None)
    assert not missing.found
    assert missing.answer.startswith("404 Not Found, ms-diagnostics 52001")
    assert (
        explain.render_text(missing)[1]
        == "  endpoint  none: no endpoint has the key nobody@contoso.com"
    )


def test_probe_health_up_down_and_why() -> None:
    found = explain.decide(SNAPSHOT, "sip:ocschat@contoso.com", Settings(), None)
    targets = [
        Target("fe1", "192.0.2.1", 5060, "udp"),
        Target("fe2", "192.0.2.2", 5060, "udp"),
        Target("fe3", "192.0.2.3", 5060, "udp"),
        Target("fe4", "192.0.2.4", 5060, "tcp"),
        Target("fe5", "192.0.2.5", 5060, "udp"),
    ]
    asked: list[tuple[str, str | None]] = []

    def pinger(address: str, port: int, transport: str, timeout: float, **kw: object) -> PingResult:
        asked.append((address, kw.get("server_hostname")))  # type: ignore[arg-type]
        if address == "192.0.2.1":
            return PingResult(200, "OK", 1.25)
        if address == "192.0.2.2":
            return PingResult(503, "Service Unavailable", 2.0)
        if address == "192.0.2.3":
            raise TimeoutError
        if address == "192.0.2.4":
            raise ConnectionRefusedError(111, "Connection refused")
        return PingResult(404, "Not Found", 0.5)

    asyncio.run(explain.probe(found, targets, Settings(), 0.5, pinger))
    health = {t.address: t.health for t in found.targets}
    assert health["192.0.2.1"] == explain.Health("up", 200, "OK", 1.2)
    assert health["192.0.2.2"] is not None and health["192.0.2.2"].state == "down"
    assert health["192.0.2.3"] == explain.Health("down", error="no answer within 0.5s")
    assert health["192.0.2.4"] == explain.Health("down", error="connection refused")
    assert health["192.0.2.5"] is not None and health["192.0.2.5"].state == "up"
    assert {name for _, name in asked} == {POOL}  # TLS checks the pool FQDN (RFC 5922)
    assert [t.address for t in found.targets] == [t.address for t in targets]


def test_tls_target_without_a_usable_client_context_is_down_naming_the_setting(
    tmp_path: Path,
) -> None:
    settings = Settings.model_validate({"tls": {"ca_bundle": str(tmp_path / "missing.pem")}})
    found = explain.decide(SNAPSHOT, "sip:ocschat@contoso.com", settings, None)
    asyncio.run(explain.probe(found, [Target("fe1", "192.0.2.1", 5041, "tls")], settings, 0.5))
    [target] = found.targets
    assert target.health is not None and target.health.state == "down"
    assert "tls.ca_bundle" in (target.health.error or "")


# the command ---------------------------------------------------------------------------
def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="pcproxy")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "table.db"
    with EndpointStore(path) as store:
        store.new("sip:ocschat@contoso.com", POOL)
    return path


def test_cli_unknown_uri_exits_1_with_json(db: Path) -> None:
    result = run("explain", "sip:nobody@contoso.com", "--db", str(db), "--json")
    assert result.exit_code == EXIT_REFUSED
    report = json.loads(result.stdout)
    assert report["found"] is False and report["answer"].startswith("404")


def test_cli_bad_uri_is_one_line_exit_2(db: Path) -> None:
    result = run("explain", "mailto:x@contoso.com", "--db", str(db))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("pcproxy: error: ")


def test_cli_missing_table_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    result = run("explain", "sip:ocschat@contoso.com", "--db", str(missing))
    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == (
        "pcproxy: error: database '%s' does not exist (see 'pcproxy endpoint new')\n" % missing
    )
    assert not missing.exists()
