"""The endpoint table: validation, lookups, all-or-nothing writes, CSV, change detection."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.store import (
    EXPORT_COLUMNS,
    SCHEMA_VERSION,
    Duplicate,
    Endpoint,
    EndpointStore,
    InvalidValue,
    NotFound,
    StoreError,
    StoreUnavailable,
    parse_mode,
    parse_port,
    parse_transport,
    read_csv,
    write_csv,
)

LYNC_EXPORT = (
    "\ufeff"
    "#TYPE Microsoft.Rtc.Management.ADConnect.Schema.OCSPersistentChatEndpoint\r\n"
    '"Identity","SipAddress","DisplayName","PersistentChatPoolFqdn","Enabled",'
    '"Name","DistinguishedName","Guid"\r\n'
    '"CN={4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70},CN=Application Contacts,CN=RTC Service,'
    'CN=Services,CN=Configuration,DC=contoso,DC=com","sip:OCSChat@contoso.com",'
    '"Group Chat (legacy)","pcpool.contoso.com","True",'
    '"{4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70}","CN={4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70},'
    'CN=Application Contacts,CN=RTC Service,CN=Services,CN=Configuration,DC=contoso,DC=com",'
    '"4f1a2b3c-0d9e-4c6b-9a1e-2f3d4c5b6a70"\r\n'
    '"CN={9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e},CN=Application Contacts,CN=RTC Service,'
    'CN=Services,CN=Configuration,DC=fabrikam,DC=com","sip:ocschat@fabrikam.com",'
    '"","PCPool2.Fabrikam.com","True",'
    '"{9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e}","CN={9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e},'
    'CN=Application Contacts,CN=RTC Service,CN=Services,CN=Configuration,DC=fabrikam,DC=com",'
    '"9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e"\r\n'
)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pcproxy.db"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[EndpointStore]:
    with EndpointStore(db_path, clock=clock) as s:
        yield s


def export_text(store: EndpointStore) -> str:
    out = io.StringIO()
    write_csv(store.export_rows(), out)
    return out.getvalue()


def test_new_returns_normalised_endpoint_with_utc_timestamps(store: EndpointStore) -> None:
    e = store.new("sip:OCSChat@Contoso.COM", "PCPool.Contoso.com.", display_name=" Group Chat ")
    assert e == Endpoint(
        sip_address="sip:OCSChat@contoso.com",
        key="ocschat@contoso.com",
        pool_fqdn="pcpool.contoso.com",
        display_name="Group Chat",
        mode=None,
        pool_port=None,
        pool_transport=None,
        created_at="2024-03-01T12:00:00Z",
        updated_at="2024-03-01T12:00:00Z",
    )
    assert store.get() == [e]


def test_addresses_differing_only_in_case_are_duplicates(store: EndpointStore) -> None:
    store.new("sip:OCSChat@Contoso.com", "pcpool.contoso.com")
    with pytest.raises(Duplicate) as info:
        store.new("sip:ocschat@contoso.com", "other.contoso.com")
    assert info.value.field == "--sip-address"
    assert info.value.value == "sip:ocschat@contoso.com"
    assert str(info.value) == (
        "--sip-address 'sip:ocschat@contoso.com' already exists (as sip:OCSChat@contoso.com)"
    )
    assert [e.pool_fqdn for e in store.get()] == ["pcpool.contoso.com"]


@pytest.mark.parametrize(
    ("kwargs", "field", "value", "problem"),
    [
        ({"sip_address": "ocschat@contoso.com"}, "--sip-address", "ocschat@contoso.com", "sip:"),
        ({"sip_address": "sip:oc schat@contoso.com"}, "--sip-address", "", "user part"),
        ({"sip_address": "sip:@contoso.com"}, "--sip-address", "sip:@contoso.com", "user part"),
        ({"sip_address": "sip:ocschat@contoso"}, "--sip-address", "", "not fully qualified"),
        ({"sip_address": "sip:ocschat@-x.com"}, "--sip-address", "", "malformed host"),
        ({"sip_address": "sip:ocschat@10.0.0.1"}, "--sip-address", "", "address"),
        ({"sip_address": "sip:ocschat@contoso.com;transport=tcp"}, "--sip-address", "", "para"),
        ({"pool_fqdn": "pcpool"}, "--pool-fqdn", "pcpool", "is not fully qualified"),
        ({"pool_fqdn": "pc_pool.contoso.com"}, "--pool-fqdn", "", "invalid label"),
        ({"pool_fqdn": ""}, "--pool-fqdn", "", "1 to 253"),
        ({"pool_port": 0}, "--pool-port", "0", "out of range"),
        ({"pool_port": 70000}, "--pool-port", "70000", "out of range"),
        ({"mode": "forward"}, "--mode", "forward", "redirect, proxy"),
        ({"pool_transport": "sctp"}, "--pool-transport", "sctp", "udp, tcp, tls"),
        ({"display_name": "a\nb"}, "--display-name", "a\nb", "control"),
        ({"display_name": "x" * 300}, "--display-name", "", "longer than"),
    ],
)
def test_each_bad_field_is_refused_naming_field_and_value(
    store: EndpointStore, kwargs: dict[str, object], field: str, value: str, problem: str
) -> None:
    args: dict[str, object] = {"sip_address": "sip:ocschat@contoso.com"}
    args["pool_fqdn"] = "pcpool.contoso.com"
    args.update(kwargs)
    with pytest.raises(InvalidValue) as info:
        store.new(**args)  # type: ignore[arg-type]
    err = info.value
    given = next(iter(kwargs.values()))
    assert err.field == field
    assert err.value == str(given)
    if value:
        assert err.value == value
    assert str(err).startswith("%s %s" % (field, repr(str(given))[:40]))
    assert problem in str(err)
    assert "\n" not in str(err)
    assert store.get() == []


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (parse_mode, "Proxy", "proxy"),
        (parse_mode, "inherit", None),
        (parse_mode, "", None),
        (parse_port, "5041", 5041),
        (parse_port, "none", None),
        (parse_transport, "TLS", "tls"),
        (parse_transport, "none", None),
    ],
)
def test_text_parsers_accept_values_and_the_not_set_words(
    parse: Callable[[str, str], object], text: str, expected: object
) -> None:
    assert parse(text, "f") == expected


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_mode, "inherited"),
        (parse_port, "0"),
        (parse_port, "65536"),
        (parse_port, "50 41"),
        (parse_port, "+5041"),
        (parse_port, "٥٠٤١"),
        (parse_transport, "sctp"),
    ],
)
def test_text_parsers_refuse_naming_field_and_value(
    parse: Callable[[str, str], object], text: str
) -> None:
    with pytest.raises(InvalidValue) as info:
        parse(text, "--x")
    assert (info.value.field, info.value.value) == ("--x", text)


@pytest.fixture
def populated(store: EndpointStore) -> EndpointStore:
    store.new("sip:ocschat@contoso.com", "pcpool.contoso.com", display_name="Group Chat")
    store.new("sip:chat2@contoso.com", "pcpool.contoso.com", display_name="Contoso Archive")
    store.new("sip:ocschat@fabrikam.com", "pcpool2.fabrikam.com", display_name="Group Chat")
    store.new("sip:legacy@litware.com", "pcpool2.fabrikam.com")
    return store


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return [e.sip_address for e in endpoints]


def test_get_without_identity_lists_all_ordered_by_key(populated: EndpointStore) -> None:
    assert addresses(populated.get()) == [
        "sip:chat2@contoso.com",
        "sip:legacy@litware.com",
        "sip:ocschat@contoso.com",
        "sip:ocschat@fabrikam.com",
    ]


def test_get_by_sip_address_ignores_case(populated: EndpointStore) -> None:
    assert addresses(populated.get("SIP:OCSCHAT@Contoso.Com")) == ["sip:ocschat@contoso.com"]


def test_get_by_display_name_is_exact_and_case_insensitive(populated: EndpointStore) -> None:
    assert addresses(populated.get("contoso archive")) == ["sip:chat2@contoso.com"]
    assert addresses(populated.get("GROUP CHAT")) == [
        "sip:ocschat@contoso.com",
        "sip:ocschat@fabrikam.com",
    ]
    with pytest.raises(NotFound):
        populated.get("Contoso")


def test_get_unknown_identity_raises_not_found(populated: EndpointStore) -> None:
    with pytest.raises(NotFound) as info:
        populated.get("sip:x@y.com")
    assert str(info.value) == "identity 'sip:x@y.com' matches no endpoint"


def test_get_malformed_sip_identity_is_invalid(populated: EndpointStore) -> None:
    with pytest.raises(InvalidValue) as info:
        populated.get("sip:a b@contoso.com")
    assert info.value.field == "identity"


def test_get_filter_matches_address_or_display_name(populated: EndpointStore) -> None:
    assert addresses(populated.get(filter="*CONTOSO*")) == [
        "sip:chat2@contoso.com",
        "sip:ocschat@contoso.com",
    ]
    assert addresses(populated.get(filter="*archive")) == ["sip:chat2@contoso.com"]
    assert addresses(populated.get(filter="sip:?egacy@*")) == ["sip:legacy@litware.com"]
    assert populated.get(filter="nothing*") == []


def test_get_by_pool_normalises_the_fqdn(populated: EndpointStore) -> None:
    assert addresses(populated.get(pool_fqdn="PCPool2.Fabrikam.com.")) == [
        "sip:legacy@litware.com",
        "sip:ocschat@fabrikam.com",
    ]
    with pytest.raises(InvalidValue):
        populated.get(pool_fqdn="pcpool2")


def test_get_result_size_caps_and_combines_with_filters(populated: EndpointStore) -> None:
    assert addresses(populated.get(result_size=2)) == [
        "sip:chat2@contoso.com",
        "sip:legacy@litware.com",
    ]
    assert addresses(populated.get("group chat", pool_fqdn="pcpool2.fabrikam.com")) == [
        "sip:ocschat@fabrikam.com"
    ]
    with pytest.raises(InvalidValue):
        populated.get(result_size=0)


def test_set_changes_only_given_fields_and_stamps_updated_at(
    populated: EndpointStore, clock: FakeClock
) -> None:
    before = populated.get("sip:chat2@contoso.com")[0]
    clock.advance(90)
    after = populated.set("contoso archive", mode="proxy", pool_port=5041)
    assert after.mode == "proxy"
    assert after.pool_port == 5041
    assert (after.pool_fqdn, after.display_name, after.pool_transport) == (
        before.pool_fqdn,
        before.display_name,
        before.pool_transport,
    )
    assert after.created_at == before.created_at == "2024-03-01T12:00:00Z"
    assert after.updated_at == "2024-03-01T12:01:30Z"
    assert populated.get("sip:chat2@contoso.com") == [after]


def test_set_none_clears_optional_fields(populated: EndpointStore) -> None:
    populated.set("sip:legacy@litware.com", mode="redirect", pool_port=5041, pool_transport="tls")
    cleared = populated.set(
        "sip:legacy@litware.com", mode=None, pool_port=None, pool_transport=None, display_name=""
    )
    assert (cleared.mode, cleared.pool_port, cleared.pool_transport, cleared.display_name) == (
        None,
        None,
        None,
        None,
    )


def test_set_moves_to_a_new_pool(populated: EndpointStore) -> None:
    moved = populated.set("sip:legacy@litware.com", pool_fqdn="NewPool.Litware.com")
    assert moved.pool_fqdn == "newpool.litware.com"


def test_set_needs_a_change_and_a_single_match(populated: EndpointStore) -> None:
    with pytest.raises(InvalidValue, match="nothing to change"):
        populated.set("sip:legacy@litware.com")
    with pytest.raises(InvalidValue, match="matches 2 endpoints.*give the SIP address"):
        populated.set("Group Chat", mode="proxy")
    with pytest.raises(NotFound):
        populated.set("sip:nobody@contoso.com", mode="proxy")


def test_failed_set_leaves_the_table_unchanged(populated: EndpointStore) -> None:
    before = export_text(populated)
    with pytest.raises(InvalidValue):
        populated.set("sip:legacy@litware.com", mode="proxy", pool_port=70000)
    with pytest.raises(InvalidValue):
        populated.set("Group Chat", mode="proxy")
    assert export_text(populated) == before


def test_remove_one_by_address_or_unique_display_name(populated: EndpointStore) -> None:
    removed = populated.remove("SIP:Legacy@Litware.com")
    assert removed.sip_address == "sip:legacy@litware.com"
    assert populated.remove("Contoso Archive").sip_address == "sip:chat2@contoso.com"
    assert len(populated.get()) == 2
    with pytest.raises(NotFound):
        populated.remove("sip:legacy@litware.com")


def test_remove_pool_removes_every_endpoint_of_that_pool(populated: EndpointStore) -> None:
    removed = populated.remove_pool("pcpool2.fabrikam.com")
    assert addresses(removed) == ["sip:legacy@litware.com", "sip:ocschat@fabrikam.com"]
    assert {e.pool_fqdn for e in populated.get()} == {"pcpool.contoso.com"}
    with pytest.raises(NotFound) as info:
        populated.remove_pool("pcpool2.fabrikam.com")
    assert str(info.value) == "--pool-fqdn 'pcpool2.fabrikam.com' has no endpoints"


def test_read_csv_reads_lync_export_csv_with_type_line_bom_and_extra_columns() -> None:
    rows = read_csv(LYNC_EXPORT.encode("utf-8"), name="lync.csv")
    assert [r.where for r in rows] == ["lync.csv line 3", "lync.csv line 4"]
    assert rows[0].cells == {
        "SipAddress": "sip:OCSChat@contoso.com",
        "DisplayName": "Group Chat (legacy)",
        "PersistentChatPoolFqdn": "pcpool.contoso.com",
    }


def test_read_csv_reads_utf16_with_bom() -> None:
    rows = read_csv(LYNC_EXPORT.removeprefix("\ufeff").encode("utf-16"), name="lync.csv")
    assert [r.cells["SipAddress"] for r in rows] == [
        "sip:OCSChat@contoso.com",
        "sip:ocschat@fabrikam.com",
    ]


def test_read_csv_matches_column_names_ignoring_case() -> None:
    rows = read_csv('"SIPADDRESS","persistentchatpoolfqdn"\n"sip:a@b.com","p.b.com"\n')
    assert rows[0].cells == {"SipAddress": "sip:a@b.com", "PersistentChatPoolFqdn": "p.b.com"}


def test_read_csv_uses_identity_only_when_sip_address_is_missing() -> None:
    rows = read_csv("Identity,PersistentChatPoolFqdn\nsip:a@b.com,p.b.com\n")
    assert rows[0].cells["SipAddress"] == "sip:a@b.com"
    assert rows[0].field("SipAddress") == "input line 2 Identity"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "has no header row"),
        (b"Identity,DisplayName\nx,y\n", "has no PersistentChatPoolFqdn column"),
        (b"SipAddress,PersistentChatPoolFqdn,sipaddress\n", "appears twice"),
        (b"SipAddress,PersistentChatPoolFqdn\nsip:a@b.com\n", "line 2 'sip:a@b.com' has 1"),
        (b'SipAddress,PersistentChatPoolFqdn\n"sip:a@b.com,p\n', "not valid CSV at line 2"),
        (b"SipAddress,PersistentChatPoolFqdn\n\xff\xfe\xfd", "not UTF-8"),
    ],
)
def test_read_csv_refuses_malformed_files(data: bytes, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        read_csv(data, name="bad.csv")


def test_import_lync_export(store: EndpointStore) -> None:
    assert store.import_rows(read_csv(LYNC_EXPORT.encode(), name="lync.csv")) == 2
    (contoso,) = store.get("sip:ocschat@contoso.com")
    assert contoso.sip_address == "sip:OCSChat@contoso.com"
    assert contoso.display_name == "Group Chat (legacy)"
    assert contoso.pool_fqdn == "pcpool.contoso.com"
    assert (contoso.mode, contoso.pool_port, contoso.pool_transport) == (None, None, None)
    (fabrikam,) = store.get("sip:ocschat@fabrikam.com")
    assert fabrikam.pool_fqdn == "pcpool2.fabrikam.com"
    assert fabrikam.display_name is None


def test_import_with_a_bad_row_on_line_3_changes_nothing(populated: EndpointStore) -> None:
    before = export_text(populated)
    generation = populated.load_snapshot().generation
    data = (
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport\n"
        "sip:new1@contoso.com,pcpool.contoso.com,,,,\n"
        "sip:new2@contoso.com,pcpool,,,,\n"
        "sip:new3@contoso.com,pcpool.contoso.com,,,,\n"
    )
    with pytest.raises(InvalidValue) as info:
        populated.import_rows(read_csv(data, name="new.csv"), replace=True)
    assert info.value.field == "new.csv line 3 PersistentChatPoolFqdn"
    assert info.value.value == "pcpool"
    assert export_text(populated) == before
    assert populated.load_snapshot().generation == generation


@pytest.mark.parametrize(
    ("line3", "field", "problem"),
    [
        ("sip:new2@contoso.com,pcpool.contoso.com,,proxi,,", "Mode", "redirect, proxy"),
        ("sip:new2@contoso.com,pcpool.contoso.com,,,0,", "PoolPort", "out of range"),
        ("sip:new2@contoso.com,pcpool.contoso.com,,,,sctp", "PoolTransport", "udp, tcp"),
        ("new2@contoso.com,pcpool.contoso.com,,,,", "SipAddress", "sip:"),
        ("sip:NEW1@Contoso.com,pcpool.contoso.com,,,,", "SipAddress", "repeats new.csv line 2"),
        ("sip:ocschat@contoso.com,pcpool.contoso.com,,,,", "SipAddress", "already exists"),
    ],
)
def test_import_refuses_bad_or_duplicate_rows_naming_line_and_column(
    populated: EndpointStore, line3: str, field: str, problem: str
) -> None:
    before = export_text(populated)
    data = (
        "SipAddress,PersistentChatPoolFqdn,DisplayName,Mode,PoolPort,PoolTransport\n"
        "sip:new1@contoso.com,pcpool.contoso.com,,,,\n" + line3 + "\n"
    )
    with pytest.raises(StoreError) as info:
        populated.import_rows(read_csv(data, name="new.csv"))
    assert info.value.field == "new.csv line 3 " + field
    assert problem in str(info.value)
    assert export_text(populated) == before


def test_export_then_import_round_trips(populated: EndpointStore, tmp_path: Path) -> None:
    populated.set("sip:legacy@litware.com", mode="proxy", pool_port=5041, pool_transport="tls")
    populated.set("sip:chat2@contoso.com", display_name='Archive, "old", ü')
    text = export_text(populated)
    assert text.splitlines()[0] == ",".join(EXPORT_COLUMNS)
    with EndpointStore(tmp_path / "copy.db") as copy:
        assert copy.import_rows(read_csv(text)) == 4
        assert export_text(copy) == text
        fields = [(e.sip_address, e.pool_fqdn, e.display_name, e.mode) for e in copy.get()]
    assert fields == [(e.sip_address, e.pool_fqdn, e.display_name, e.mode) for e in populated.get()]


def test_import_accepts_plain_mappings(store: EndpointStore) -> None:
    rows = [{"sipaddress": "sip:a@contoso.com", "PersistentChatPoolFqdn": "p.contoso.com"}]
    assert store.import_rows(rows) == 1
    with pytest.raises(InvalidValue) as info:
        store.import_rows([{"SipAddress": "sip:b@contoso.com", "PoolPort": "1"}])
    assert info.value.field == "row 1 header"


def test_import_replace_swaps_the_table_and_keeps_created_at(
    populated: EndpointStore, clock: FakeClock
) -> None:
    clock.advance(3600)
    data = (
        "SipAddress,PersistentChatPoolFqdn\n"
        "sip:ocschat@contoso.com,newpool.contoso.com\n"
        "sip:brand-new@contoso.com,newpool.contoso.com\n"
    )
    assert populated.import_rows(read_csv(data), replace=True) == 2
    kept, new = (
        populated.get("sip:ocschat@contoso.com")[0],
        populated.get("sip:brand-new@contoso.com")[0],
    )
    assert addresses(populated.get()) == ["sip:brand-new@contoso.com", "sip:ocschat@contoso.com"]
    assert kept.pool_fqdn == "newpool.contoso.com"
    assert kept.created_at == "2024-03-01T12:00:00Z"
    assert kept.updated_at == new.created_at == "2024-03-01T13:00:00Z"


def test_new_file_gets_the_current_schema_version_and_wal(db_path: Path) -> None:
    EndpointStore(db_path).close()
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in raw.execute("PRAGMA table_info(endpoint)")]
        assert "key" in columns and "pool_transport" in columns
    finally:
        raw.close()
    with EndpointStore(db_path) as again:
        assert again.schema_version() == SCHEMA_VERSION


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    EndpointStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = %d" % (SCHEMA_VERSION + 1))
    raw.close()
    with pytest.raises(StoreUnavailable, match="newer than this pcproxy"):
        EndpointStore(db_path)


def test_a_foreign_sqlite_file_is_refused_and_left_alone(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE users (name TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(StoreUnavailable, match="not a pcproxy table"):
        EndpointStore(db_path)
    raw = sqlite3.connect(db_path)
    assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master")] == ["users"]
    raw.close()


def test_a_file_that_is_not_sqlite_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(StoreUnavailable) as info:
        EndpointStore(db_path)
    assert info.value.value == str(db_path)


def test_a_missing_directory_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "pcproxy.db"
    with pytest.raises(StoreUnavailable) as info:
        EndpointStore(path)
    assert info.value.field == "database"
    assert info.value.value == str(path)
    assert not path.parent.exists()


def test_data_version_moves_when_another_connection_commits(db_path: Path) -> None:
    with EndpointStore(db_path) as daemon, EndpointStore(db_path) as cli:
        seen = daemon.data_version()
        assert daemon.data_version() == seen
        cli.new("sip:ocschat@contoso.com", "pcpool.contoso.com")
        changed = daemon.data_version()
        assert changed != seen
        daemon.new("sip:other@contoso.com", "pcpool.contoso.com")
        assert daemon.data_version() == changed
        assert len(daemon.load_snapshot()) == 2


def test_snapshot_looks_up_by_key_and_counts_generations(populated: EndpointStore) -> None:
    snap = populated.load_snapshot()
    assert len(snap) == 4
    assert snap.generation == 4
    found = snap.lookup("ocschat@contoso.com")
    assert found is not None and found.pool_fqdn == "pcpool.contoso.com"
    assert snap.lookup("OCSChat@contoso.com") is None
    populated.remove("sip:legacy@litware.com")
    later = populated.load_snapshot()
    assert later.generation == 5
    assert len(snap) == 4 and len(later) == 3


def test_snapshot_refuses_a_row_edited_by_hand(populated: EndpointStore, db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE endpoint SET pool_fqdn = 'pcpool' WHERE key = 'legacy@litware.com'")
    raw.commit()
    raw.close()
    with pytest.raises(InvalidValue, match="database row legacy@litware.com"):
        populated.load_snapshot()


def test_a_write_proceeds_while_another_connection_reads(
    populated: EndpointStore, db_path: Path
) -> None:
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM endpoint").fetchone()[0] == 4
        populated.new("sip:during-read@contoso.com", "pcpool.contoso.com")
        assert reader.execute("SELECT count(*) FROM endpoint").fetchone()[0] == 4
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM endpoint").fetchone()[0] == 5
    finally:
        reader.close()


def test_a_locked_table_gives_a_clear_error_and_no_change(db_path: Path) -> None:
    with EndpointStore(db_path, busy_timeout=0.05) as store:
        store.new("sip:ocschat@contoso.com", "pcpool.contoso.com")
        before = export_text(store)
        writer = sqlite3.connect(db_path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailable) as info:
                store.new("sip:second@contoso.com", "pcpool.contoso.com")
            assert str(info.value) == (
                "database %r is locked by another writer; try again" % str(db_path)
            )
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        assert export_text(store) == before
        store.new("sip:second@contoso.com", "pcpool.contoso.com")
        assert len(store.get()) == 2
