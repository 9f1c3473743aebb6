"""SIGHUP reload: which keys changed, which hooks apply them, what needs a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from proxy.config import ListenAddress, Settings
from proxy.reload import ReloadHook, apply, changed_keys, replace


def settings(**sections: dict[str, object]) -> Settings:
    return Settings.model_validate(sections)


def test_changed_keys_descend_into_sections_and_compare_lists_whole() -> None:
    old = settings()
    new = settings(
        server={"listen": ["udp:127.0.0.1:5070"], "drain_timeout": 9.0},
        log={"level": "debug"},
        tls={"min_version": "1.3"},
    )
    assert changed_keys(old, new) == [
        "server.listen",
        "server.drain_timeout",
        "log.level",
        "tls.min_version",
    ]
    assert changed_keys(new, new) == []


def test_replace_sets_one_nested_key_and_leaves_the_original_alone() -> None:
    old = settings()
    new = replace(old, "log.level", "error")
    assert new.log.level == "error" and old.log.level == "info"
    assert new.server == old.server


def test_a_covered_key_is_applied_and_an_uncovered_one_needs_a_restart() -> None:
    seen: list[Settings] = []
    hooks = [ReloadHook("log", ("log.level",), seen.append)]
    old = settings()
    new = settings(log={"level": "warning"}, server={"listen": ["tcp:127.0.0.1:5999"]})
    report = apply(old, new, hooks)
    assert report.applied == ["log"] and report.failed == {}
    assert report.changed == ["server.listen", "log.level"]
    assert report.restart == ["server.listen"]
    # the hook and the result see the new level, never the listen address not in effect
    assert seen[0].log.level == "warning" and seen[0].server.listen == old.server.listen
    assert report.settings.log.level == "warning"
    assert report.settings.server.listen == old.server.listen


def test_every_hook_runs_even_when_nothing_changed() -> None:
    calls: list[str] = []
    hooks = [
        ReloadHook("tls", ("tls.certificate",), lambda s: calls.append("tls")),
        ReloadHook("table", ("table.poll_interval",), lambda s: calls.append("table")),
    ]
    report = apply(settings(), settings(), hooks)
    assert calls == ["tls", "table"]
    assert report.applied == ["tls", "table"] and report.changed == report.restart == []


def test_a_failed_hook_keeps_its_keys_running_and_the_others_apply(tmp_path: Path) -> None:
    def refuse(s: Settings) -> None:
        raise ValueError("tls.certificate: %s: file not found" % s.tls.certificate)

    hooks = [
        ReloadHook("tls", ("tls.certificate", "tls.private_key"), refuse),
        ReloadHook("log", ("log.level",), lambda s: None),
    ]
    old = settings()
    cert, key = tmp_path / "new.pem", tmp_path / "new.key"
    new = settings(tls={"certificate": str(cert), "private_key": str(key)}, log={"level": "error"})
    report = apply(old, new, hooks)
    assert report.failed == {"tls": "tls.certificate: %s: file not found" % cert}
    assert report.applied == ["log"]
    assert report.settings.tls == old.tls
    assert report.settings.log.level == "error"
    assert report.restart == []


def test_a_hook_may_cover_a_whole_section() -> None:
    hook = ReloadHook("dns", ("dns",), lambda s: None)
    assert hook.covers("dns.timeout") and hook.covers("dns")
    assert not hook.covers("dnssec.enabled") and not hook.covers("server.listen")
    report = apply(settings(), settings(dns={"timeout": 1.0, "lifetime": 2.0}), [hook])
    assert report.restart == [] and report.settings.dns.timeout == 1.0


@pytest.mark.parametrize("key", ["tls.min_version", "tls.require_client_certificate"])
def test_tls_keys_fixed_in_the_listener_context_need_a_restart(key: str) -> None:
    from proxy.server import TLS_RUNTIME_KEYS

    hook = ReloadHook("tls", TLS_RUNTIME_KEYS, lambda s: None)
    assert not hook.covers(key)
    assert hook.covers("tls.certificate") and hook.covers("tls.allowed_peers")


def test_listen_addresses_compare_by_value() -> None:
    a = settings(server={"listen": ["udp:127.0.0.1:5060"]})
    b = Settings().model_copy(
        update={
            "server": a.server.model_copy(
                update={"listen": [ListenAddress.parse("udp:127.0.0.1:5060")]}
            )
        }
    )
    assert changed_keys(a, b) == []


def test_the_tls_hook_swaps_listener_and_pool_contexts_or_neither(tmp_path: Path) -> None:
    from proxy import tls
    from proxy.server import Server

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for stem in ("old", "new"):
        cert = ca.issue_cert("pcproxy.contoso.com")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / ("%s.pem" % stem)))
        cert.private_key_pem.write_to_path(str(tmp_path / ("%s.key" % stem)))

    def with_identity(stem: str) -> Settings:
        return settings(
            server={"listen": ["tls:127.0.0.1:0"]},
            tls={
                "certificate": str(tmp_path / ("%s.pem" % stem)),
                "private_key": str(tmp_path / ("%s.key" % stem)),
                "ca_bundle": str(tmp_path / "ca.pem"),
            },
        )

    server = Server(with_identity("old"))
    server.server_contexts = tls.ServerContexts(server.settings.tls)
    first = (server._client_context(), server.server_contexts.current)
    report = apply(server.settings, with_identity("new"), server.reload_hooks)
    assert "tls" in report.applied
    assert server._client_context() is not first[0]
    assert server.server_contexts.current is not first[1]
    assert server.server_contexts.settings.certificate == tmp_path / "new.pem"

    (tmp_path / "bad.pem").write_text("not a certificate\n")
    (tmp_path / "bad.key").write_text("not a key\n")
    second = (server._client_context(), server.server_contexts.current)
    report = apply(report.settings, with_identity("bad"), server.reload_hooks)
    assert report.failed["tls"].startswith("tls.certificate: %s" % (tmp_path / "bad.pem"))
    assert (server._client_context(), server.server_contexts.current) == second
    assert report.settings.tls.certificate == tmp_path / "new.pem"
