"""Configuration: the example file is the defaults; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, ListenAddress, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pcproxy.toml"


def test_example_config_documents_exactly_the_defaults() -> None:
    assert load_settings(EXAMPLE) == Settings()


def test_defaults_listen_on_loopback_only() -> None:
    hosts = {addr.host for addr in Settings().server.listen}
    assert hosts == {"127.0.0.1", "::1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp:127.0.0.1:5060", ("udp", "127.0.0.1", 5060)),
        ("TCP:[::1]:0", ("tcp", "::1", 0)),
    ],
)
def test_listen_address_parses(text: str, expected: tuple[str, str, int]) -> None:
    addr = ListenAddress.parse(text)
    assert (addr.transport, addr.host, addr.port) == expected


@pytest.mark.parametrize(
    "text", ["sctp:127.0.0.1:5060", "udp:example.com:5060", "udp:127.0.0.1:70000", "udp:127.0.0.1"]
)
def test_listen_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ListenAddress.parse(text)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[server]\nlisten = ["udp:127.0.0.1:99999"]\n', "server.listen[0]"),
        ('[server]\nmode = "relay"\n', "server.mode"),
        ("[sip]\nt1 = -1\n", "sip.t1"),
        ("[table]\nunknown = 1\n", "table.unknown"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, toml: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=r"bad\.toml: .*%s" % field.replace("[", r"\[")):
        load_settings(path)


def test_unreadable_or_invalid_toml_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9060", ("127.0.0.1", 9060)), ("[::1]:0", ("::1", 0)), ("", None)],
)
def test_metrics_listen_parses_or_is_off(text: str, expected: tuple[str, int] | None) -> None:
    assert Settings.model_validate({"metrics": {"listen": text}}).metrics.endpoint() == expected


@pytest.mark.parametrize("text", ["localhost:9060", "127.0.0.1", "127.0.0.1:99999"])
def test_metrics_listen_rejects_what_is_not_ip_and_port(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[metrics]\nlisten = "%s"\n' % text)
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_settings(path)
