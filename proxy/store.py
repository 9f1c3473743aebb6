"""The endpoint table in SQLite: validation, CSV exchange, snapshots, change detection.

It holds what ``New-CsPersistentChatEndpoint`` creates in Lync: a legacy Group
Chat SIP address homed on a Persistent Chat pool, plus pcproxy's own per-endpoint
choices (mode, pool port, pool transport; ``None`` means "not set", so the
daemon's default applies).

Theory of operation.  One writer at a time, many readers: the file runs in WAL
journal mode, every write is one ``BEGIN IMMEDIATE`` transaction that either
commits whole or leaves the table as it was, and a ``busy_timeout`` lets a CLI
write wait for the daemon's read (and the other way round).  Every value is
validated before any SQL runs; errors are ``StoreError`` subclasses naming the
field and the value.  The daemon polls ``data_version()``, which changes when
another connection commits, and then calls ``load_snapshot()`` for an
immutable ``Snapshot`` it swaps in whole.  The schema carries its version in
``PRAGMA user_version``; ``MIGRATIONS`` lists the steps from one version to the
next, and opening a file applies the missing ones in one transaction.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import fnmatch
import io
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Final, get_args

from proxy.config import Mode, Transport
from proxy.sip.errors import UriError
from proxy.sip.uri import AddressOfRecord, normalise_fqdn

MODES: Final[tuple[str, ...]] = get_args(Mode)
TRANSPORTS: Final[tuple[str, ...]] = get_args(Transport)
MAX_DISPLAY_NAME = 256
DEFAULT_BUSY_TIMEOUT = 5.0

EXPORT_COLUMNS: Final = (
    "SipAddress",
    "PersistentChatPoolFqdn",
    "DisplayName",
    "Mode",
    "PoolPort",
    "PoolTransport",
)
"""pcproxy's CSV columns; the first four are also read from Lync's Export-Csv."""

_REQUIRED_COLUMNS = ("SipAddress", "PersistentChatPoolFqdn")
_NOT_SET = ("", "none", "inherit")
_BAD_MODE = "is not one of redirect, proxy, inherit"
_BAD_TRANSPORT = "is not one of udp, tcp, tls, none"

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE endpoint (
            key TEXT NOT NULL UNIQUE,
            sip_address TEXT NOT NULL,
            pool_fqdn TEXT NOT NULL,
            display_name TEXT,
            mode TEXT CHECK (mode IN ('redirect', 'proxy')),
            pool_port INTEGER CHECK (pool_port BETWEEN 1 AND 65535),
            pool_transport TEXT CHECK (pool_transport IN ('udp', 'tcp', 'tls')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX endpoint_pool_fqdn ON endpoint (pool_fqdn)",
        """CREATE TABLE meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        )""",
        "INSERT INTO meta (id, generation) VALUES (1, 0)",
    ),
)
"""Schema steps: ``MIGRATIONS[n]`` takes ``user_version`` n to n + 1.

Append a step to change the schema (e.g. ``ALTER TABLE endpoint ADD COLUMN``);
never edit a released one.
"""

SCHEMA_VERSION: Final = len(MIGRATIONS)

_SELECT = (
    "SELECT sip_address, key, pool_fqdn, display_name, mode, pool_port, pool_transport,"
    " created_at, updated_at FROM endpoint"
)


class StoreError(Exception):
    """A value or state the endpoint table refuses; one line naming field and value.

    ``field`` says where the value came from (``--pool-fqdn``, ``identity``,
    ``endpoints.csv line 3 SipAddress``); ``problem`` says what is wrong with it.
    """

    def __init__(self, field: str, value: str, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        shown = value if len(value) <= 120 else value[:117] + "..."
        super().__init__("%s %r %s" % (field, shown, problem))


class InvalidValue(StoreError):
    """Bad input: a malformed field, an ambiguous identity, a malformed CSV file."""


class NotFound(StoreError):
    """No endpoint matches the identity or pool (Remove-CsPersistentChatEndpoint's error)."""


class Duplicate(StoreError):
    """The SIP address is already taken: it must be unique, as in Lync."""


class StoreUnavailable(StoreError):
    """The database cannot be opened, read or written (missing directory, locked, foreign)."""


class Unset(enum.Enum):
    """Marks an argument of ``EndpointStore.set`` that was not given."""

    UNSET = enum.auto()


UNSET: Final = Unset.UNSET


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One row: the fields of a Lync Persistent Chat endpoint plus pcproxy's options."""

    sip_address: str
    key: str
    pool_fqdn: str
    display_name: str | None
    mode: Mode | None
    pool_port: int | None
    pool_transport: Transport | None
    created_at: str
    updated_at: str

    def export_row(self) -> dict[str, str]:
        """This endpoint as a row of ``EXPORT_COLUMNS`` ('' for not set)."""
        values = (
            self.sip_address,
            self.pool_fqdn,
            self.display_name or "",
            self.mode or "",
            "" if self.pool_port is None else str(self.pool_port),
            self.pool_transport or "",
        )
        return dict(zip(EXPORT_COLUMNS, values, strict=True))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole table at one commit, keyed by ``AddressOfRecord.key``.

    ``generation`` counts committed write commands, so two snapshots with the
    same generation hold the same endpoints.
    """

    endpoints: Mapping[str, Endpoint]
    generation: int

    def lookup(self, key: str) -> Endpoint | None:
        """The endpoint whose identity key is ``key`` (see ``SipUri.aor_key``)."""
        return self.endpoints.get(key)

    def __len__(self) -> int:
        return len(self.endpoints)


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One data row of an import file, its cells keyed by ``EXPORT_COLUMNS`` names.

    ``where`` locates it (``endpoints.csv line 3``); ``names`` maps a column to
    its header as written, so errors quote the operator's own spelling.
    """

    where: str
    cells: Mapping[str, str]
    names: Mapping[str, str]

    def field(self, column: str) -> str:
        return "%s %s" % (self.where, self.names.get(column, column))


def parse_mode(text: str, field: str) -> Mode | None:
    """``redirect`` or ``proxy``; ``''``, ``inherit`` or ``none`` give None (the daemon's)."""
    value = text.strip().lower()
    if value in _NOT_SET:
        return None
    if value not in MODES:
        raise InvalidValue(field, text, _BAD_MODE)
    return _check_mode(value, field)


def parse_port(text: str, field: str) -> int | None:
    """A port 1-65535; ``''`` or ``none`` give None (the transport's default)."""
    value = text.strip().lower()
    if value in _NOT_SET:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 5:
        raise InvalidValue(field, text, "is not a port number (1-65535, or none)")
    return _check_port(int(value), field)


def parse_transport(text: str, field: str) -> Transport | None:
    """``udp``, ``tcp`` or ``tls``; ``''`` or ``none`` give None (RFC 3263 selection)."""
    value = text.strip().lower()
    if value in _NOT_SET:
        return None
    if value not in TRANSPORTS:
        raise InvalidValue(field, text, _BAD_TRANSPORT)
    return _check_transport(value, field)


def _check_sip_address(text: str, field: str) -> AddressOfRecord:
    try:
        return AddressOfRecord.parse(text)
    except UriError as exc:
        reason = exc.reason
        if not reason.startswith(("must ", "has ")):
            reason = "is not a valid SIP address: " + reason
        raise InvalidValue(field, text, reason) from None


def _check_pool_fqdn(text: str, field: str) -> str:
    """``normalise_fqdn`` with its reason cut to the problem (its prefix names ``what``)."""
    marker = "\0"
    try:
        return normalise_fqdn(text, what=marker)
    except UriError as exc:
        problem = exc.reason.removeprefix("%s %r " % (marker, text)).removeprefix(marker + " ")
        raise InvalidValue(field, text, problem) from None


def _check_display_name(text: str | None, field: str) -> str | None:
    if text is None or not text.strip():
        return None
    name = text.strip()
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidValue(field, name, "is longer than %d characters" % MAX_DISPLAY_NAME)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidValue(field, name, "contains control characters")
    return name


def _check_mode(value: object, field: str) -> Mode | None:
    if value is None:
        return None
    if value == "redirect":
        return "redirect"
    if value == "proxy":
        return "proxy"
    raise InvalidValue(field, str(value), _BAD_MODE)


def _check_port(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidValue(field, str(value), "is out of range (1-65535, or none)")
    return value


def _check_transport(value: object, field: str) -> Transport | None:
    if value is None:
        return None
    if value == "udp":
        return "udp"
    if value == "tcp":
        return "tcp"
    if value == "tls":
        return "tls"
    raise InvalidValue(field, str(value), _BAD_TRANSPORT)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EndpointStore:
    """The endpoint table in one SQLite file, safe to share with a running daemon.

    Mirrors the New-, Get- and Remove-CsPersistentChatEndpoint cmdlets, adds
    ``set`` (Lync has none: there an operator removes and re-creates) and CSV
    import and export.  A write waits up to ``busy_timeout`` seconds (default
    ``DEFAULT_BUSY_TIMEOUT``) for another writer; ``clock`` gives the time
    stamped on writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        parent = self.path.parent
        if not parent.is_dir():
            raise StoreUnavailable(
                "database", str(self.path), "cannot be created: no directory %s" % parent
            )
        with self._translated():
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            with self._translated():
                wait = DEFAULT_BUSY_TIMEOUT if busy_timeout is None else busy_timeout
                self._db.execute("PRAGMA busy_timeout = %d" % int(wait * 1000))
                self._migrate()
                if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> EndpointStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def schema_version(self) -> int:
        """``PRAGMA user_version``: how many ``MIGRATIONS`` this file has had."""
        with self._lock, self._translated():
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def data_version(self) -> int:
        """``PRAGMA data_version``: changes when another connection commits.

        The daemon polls it (it is cheap: no disk read) and reloads the
        snapshot when it moves; this connection's own commits do not move it.
        """
        with self._lock, self._translated():
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def new(
        self,
        sip_address: str,
        pool_fqdn: str,
        *,
        display_name: str | None = None,
        mode: Mode | None = None,
        pool_port: int | None = None,
        pool_transport: Transport | None = None,
    ) -> Endpoint:
        """Add an endpoint, as New-CsPersistentChatEndpoint does.

        The SIP address needs ``sip:`` and must be unique by key (Lync treats
        addresses case-insensitively).
        """
        aor = _check_sip_address(sip_address, "--sip-address")
        now = self._now()
        endpoint = Endpoint(
            sip_address=aor.text,
            key=aor.key,
            pool_fqdn=_check_pool_fqdn(pool_fqdn, "--pool-fqdn"),
            display_name=_check_display_name(display_name, "--display-name"),
            mode=_check_mode(mode, "--mode"),
            pool_port=_check_port(pool_port, "--pool-port"),
            pool_transport=_check_transport(pool_transport, "--pool-transport"),
            created_at=now,
            updated_at=now,
        )
        with self._writing():
            existing = self._by_key(aor.key)
            if existing is not None:
                raise Duplicate(
                    "--sip-address",
                    sip_address.strip(),
                    "already exists (as %s)" % existing.sip_address,
                )
            self._insert(endpoint)
        return endpoint

    def get(
        self,
        identity: str | None = None,
        *,
        filter: str | None = None,
        pool_fqdn: str | None = None,
        result_size: int | None = None,
    ) -> list[Endpoint]:
        """Endpoints ordered by key, as Get-CsPersistentChatEndpoint lists them.

        ``identity`` is a SIP address (matched by key) or a display name
        (exact, case-insensitive; it may match several); one that matches
        nothing raises ``NotFound``.  ``filter`` is a wildcard pattern
        (``*`` and ``?``, like -Filter) tried against the SIP address and the
        display name, case-insensitively.  ``result_size`` caps the count.
        """
        pool = None if pool_fqdn is None else _check_pool_fqdn(pool_fqdn, "--pool-fqdn")
        if result_size is not None and (
            isinstance(result_size, bool) or not isinstance(result_size, int) or result_size < 1
        ):
            raise InvalidValue("--result-size", str(result_size), "must be 1 or more")
        with self._reading():
            found = self._all() if identity is None else self._matching(identity)
        if identity is not None and not found:
            raise NotFound("identity", identity, "matches no endpoint")
        if pool is not None:
            found = [e for e in found if e.pool_fqdn == pool]
        if filter is not None:
            pattern = filter.casefold()
            found = [
                e
                for e in found
                if fnmatch.fnmatchcase(e.sip_address.casefold(), pattern)
                or (
                    e.display_name is not None
                    and fnmatch.fnmatchcase(e.display_name.casefold(), pattern)
                )
            ]
        return found if result_size is None else found[:result_size]

    def set(
        self,
        identity: str,
        *,
        pool_fqdn: str | Unset = UNSET,
        display_name: str | None | Unset = UNSET,
        mode: Mode | None | Unset = UNSET,
        pool_port: int | None | Unset = UNSET,
        pool_transport: Transport | None | Unset = UNSET,
    ) -> Endpoint:
        """Change the given fields of one endpoint and stamp ``updated_at``.

        A field left ``UNSET`` keeps its value; ``None`` clears an optional
        one (mode back to inherit, port and transport to not set, no display
        name).  Lync has no Set cmdlet; this saves a remove and re-create.
        """
        new_pool = UNSET if pool_fqdn is UNSET else _check_pool_fqdn(pool_fqdn, "--pool-fqdn")
        new_name = (
            UNSET if display_name is UNSET else _check_display_name(display_name, "--display-name")
        )
        new_mode = UNSET if mode is UNSET else _check_mode(mode, "--mode")
        new_port = UNSET if pool_port is UNSET else _check_port(pool_port, "--pool-port")
        new_transport = (
            UNSET
            if pool_transport is UNSET
            else _check_transport(pool_transport, "--pool-transport")
        )
        if all(v is UNSET for v in (new_pool, new_name, new_mode, new_port, new_transport)):
            raise InvalidValue(
                "identity",
                identity,
                "is given nothing to change (use --pool-fqdn, --display-name, --mode,"
                " --pool-port or --pool-transport)",
            )
        with self._writing():
            old = self._one(identity)
            updated = Endpoint(
                sip_address=old.sip_address,
                key=old.key,
                pool_fqdn=old.pool_fqdn if new_pool is UNSET else new_pool,
                display_name=old.display_name if new_name is UNSET else new_name,
                mode=old.mode if new_mode is UNSET else new_mode,
                pool_port=old.pool_port if new_port is UNSET else new_port,
                pool_transport=old.pool_transport if new_transport is UNSET else new_transport,
                created_at=old.created_at,
                updated_at=self._now(),
            )
            self._db.execute(
                "UPDATE endpoint SET pool_fqdn = ?, display_name = ?, mode = ?, pool_port = ?,"
                " pool_transport = ?, updated_at = ? WHERE key = ?",
                (
                    updated.pool_fqdn,
                    updated.display_name,
                    updated.mode,
                    updated.pool_port,
                    updated.pool_transport,
                    updated.updated_at,
                    updated.key,
                ),
            )
        return updated

    def remove(self, identity: str) -> Endpoint:
        """Delete one endpoint, as Remove-CsPersistentChatEndpoint -Identity does."""
        with self._writing():
            endpoint = self._one(identity)
            self._db.execute("DELETE FROM endpoint WHERE key = ?", (endpoint.key,))
        return endpoint

    def remove_pool(self, pool_fqdn: str) -> list[Endpoint]:
        """Delete every endpoint homed on a pool.

        Mirrors ``Get-CsPersistentChatEndpoint -PersistentChatPoolFqdn X |
        Remove-CsPersistentChatEndpoint``; a pool with none raises ``NotFound``.
        """
        pool = _check_pool_fqdn(pool_fqdn, "--pool-fqdn")
        with self._writing():
            removed = [e for e in self._all() if e.pool_fqdn == pool]
            if not removed:
                raise NotFound("--pool-fqdn", pool_fqdn, "has no endpoints")
            self._db.execute("DELETE FROM endpoint WHERE pool_fqdn = ?", (pool,))
        return removed

    def import_rows(
        self, rows: Iterable[CsvRow | Mapping[str, str]], *, replace: bool = False
    ) -> int:
        """Add every row in one transaction, or none of them.

        Rows come from ``read_csv`` or are plain mappings with ``EXPORT_COLUMNS``
        keys (any case).  A bad value, a SIP address twice in the rows, or one
        already in the table (unless ``replace``) raises a ``StoreError`` naming
        the row and column, and the table stays as it was.  With ``replace``
        the rows become the whole table; endpoints that stay keep ``created_at``.
        """
        checked: dict[str, tuple[Endpoint, CsvRow]] = {}
        now = self._now()
        for number, item in enumerate(rows, 1):
            row = item if isinstance(item, CsvRow) else _row_from_mapping(item, number)
            endpoint = _endpoint_from_row(row, now)
            first = checked.get(endpoint.key)
            if first is not None:
                raise Duplicate(
                    row.field("SipAddress"),
                    row.cells["SipAddress"],
                    "repeats %s (%s)" % (first[1].where, first[0].sip_address),
                )
            checked[endpoint.key] = (endpoint, row)
        with self._writing():
            existing = {e.key: e for e in self._all()}
            if replace:
                self._db.execute("DELETE FROM endpoint")
            for endpoint, row in checked.values():
                old = existing.get(endpoint.key)
                if old is not None and not replace:
                    raise Duplicate(
                        row.field("SipAddress"),
                        row.cells["SipAddress"],
                        "already exists (as %s)" % old.sip_address,
                    )
                if old is not None:
                    endpoint = dataclasses.replace(endpoint, created_at=old.created_at)
                self._insert(endpoint)
        return len(checked)

    def export_rows(self) -> list[dict[str, str]]:
        """Every endpoint as a row of ``EXPORT_COLUMNS``, ordered by key."""
        with self._reading():
            return [e.export_row() for e in self._all()]

    def load_snapshot(self) -> Snapshot:
        """The whole table as of one commit, each row validated again.

        Rows written by hand with the sqlite3 shell bypass this class; a row
        that no longer validates raises ``InvalidValue`` so that the daemon
        keeps its previous snapshot rather than serve a half-good table.
        """
        with self._reading():
            generation = int(self._db.execute("SELECT generation FROM meta").fetchone()[0])
            endpoints = self._all()
        for e in endpoints:
            where = "database row %s" % e.key
            aor = _check_sip_address(e.sip_address, where + " sip_address")
            if aor.key != e.key:
                raise InvalidValue(where + " key", e.key, "does not match %s" % e.sip_address)
            if _check_pool_fqdn(e.pool_fqdn, where + " pool_fqdn") != e.pool_fqdn:
                raise InvalidValue(where + " pool_fqdn", e.pool_fqdn, "is not normalised")
        return Snapshot(MappingProxyType({e.key: e for e in endpoints}), generation)

    def _now(self) -> str:
        return self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _all(self) -> list[Endpoint]:
        cursor = self._db.execute(_SELECT + " ORDER BY key")
        return [Endpoint(*row) for row in cursor]

    def _by_key(self, key: str) -> Endpoint | None:
        row = self._db.execute(_SELECT + " WHERE key = ?", (key,)).fetchone()
        return None if row is None else Endpoint(*row)

    def _matching(self, identity: str) -> list[Endpoint]:
        """Identity as Lync reads it: a SIP address if it starts ``sip:``, else a name."""
        text = identity.strip()
        if text.lower().startswith("sip:"):
            found = self._by_key(_check_sip_address(text, "identity").key)
            return [] if found is None else [found]
        folded = text.casefold()
        return [
            e
            for e in self._all()
            if e.display_name is not None and e.display_name.casefold() == folded
        ]

    def _one(self, identity: str) -> Endpoint:
        found = self._matching(identity)
        if not found:
            raise NotFound("identity", identity, "matches no endpoint")
        if len(found) > 1:
            raise InvalidValue(
                "identity",
                identity,
                "matches %d endpoints by display name (%s); give the SIP address"
                % (len(found), ", ".join(e.sip_address for e in found)),
            )
        return found[0]

    def _insert(self, e: Endpoint) -> None:
        self._db.execute(
            "INSERT INTO endpoint (sip_address, key, pool_fqdn, display_name, mode, pool_port,"
            " pool_transport, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e.sip_address,
                e.key,
                e.pool_fqdn,
                e.display_name,
                e.mode,
                e.pool_port,
                e.pool_transport,
                e.created_at,
                e.updated_at,
            ),
        )

    def _migrate(self) -> None:
        version = self.schema_version()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                "database",
                str(self.path),
                "has schema version %d, newer than this pcproxy knows (%d)"
                % (version, SCHEMA_VERSION),
            )
        with self._transaction():
            version = self.schema_version()
            if version == 0 and self._db.execute("SELECT 1 FROM sqlite_master").fetchone():
                raise StoreUnavailable(
                    "database", str(self.path), "is an SQLite file but not a pcproxy table"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    self._db.execute(statement)
            self._db.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn sqlite3's exceptions into one ``StoreUnavailable`` line."""
        try:
            yield
        except sqlite3.Error as exc:
            message = str(exc)
            if "locked" in message or "busy" in message:
                problem = "is locked by another writer; try again"
            elif "readonly" in message:
                problem = "is read-only"
            else:
                problem = "cannot be used: %s" % message
            raise StoreUnavailable("database", str(self.path), problem) from None

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
        with self._lock, self._translated():
            self._db.execute(begin)
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write command: all or nothing, and one more generation."""
        with self._transaction():
            yield
            self._db.execute("UPDATE meta SET generation = generation + 1")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Several SELECTs that see the same commit (a WAL read transaction)."""
        with self._transaction("BEGIN DEFERRED"):
            yield


def _row_from_mapping(mapping: Mapping[str, str], number: int) -> CsvRow:
    where = "row %d" % number
    columns = _resolve_columns(list(mapping), where)
    cells = list(mapping.values())
    return CsvRow(
        where,
        {c: cells[i] or "" for c, i in columns.items()},
        {c: list(mapping)[i] for c, i in columns.items()},
    )


def _endpoint_from_row(row: CsvRow, now: str) -> Endpoint:
    cells = row.cells
    aor = _check_sip_address(cells["SipAddress"], row.field("SipAddress"))
    return Endpoint(
        sip_address=aor.text,
        key=aor.key,
        pool_fqdn=_check_pool_fqdn(
            cells["PersistentChatPoolFqdn"], row.field("PersistentChatPoolFqdn")
        ),
        display_name=_check_display_name(cells.get("DisplayName"), row.field("DisplayName")),
        mode=parse_mode(cells.get("Mode", ""), row.field("Mode")),
        pool_port=parse_port(cells.get("PoolPort", ""), row.field("PoolPort")),
        pool_transport=parse_transport(cells.get("PoolTransport", ""), row.field("PoolTransport")),
        created_at=now,
        updated_at=now,
    )


def _resolve_columns(header: Sequence[str], where: str) -> dict[str, int]:
    """Map ``EXPORT_COLUMNS`` names to header positions, ignoring case and other columns.

    Lync's export has ``Identity`` (an AD distinguished name) beside
    ``SipAddress``; ``Identity`` stands in for ``SipAddress`` only when the
    latter is missing.
    """
    position: dict[str, int] = {}
    for index, name in enumerate(header):
        folded = name.strip().casefold()
        if folded in position:
            raise InvalidValue(where + " header", name, "appears twice")
        position[folded] = index
    columns = {c: position[c.casefold()] for c in EXPORT_COLUMNS if c.casefold() in position}
    if "SipAddress" not in columns and "identity" in position:
        columns["SipAddress"] = position["identity"]
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InvalidValue(
            where + " header", ",".join(header), "has no %s column" % " or ".join(missing)
        )
    return columns


def _decode(data: bytes, name: str) -> str:
    """UTF-8 with or without BOM; UTF-16 with BOM (PowerShell's ``-Encoding Unicode``)."""
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InvalidValue(
            "file",
            name,
            "is not %s text (byte 0x%02x at offset %d)"
            % (encoding.upper().removesuffix("-SIG"), data[exc.start], exc.start),
        ) from None


def read_csv(source: str | bytes | IO[str] | IO[bytes], *, name: str = "input") -> list[CsvRow]:
    """Read pcproxy's export or ``Get-CsPersistentChatEndpoint | Export-Csv`` output.

    An optional ``#TYPE`` first line (Windows PowerShell's type note) is
    skipped; column names are matched case-insensitively and unknown columns
    ignored.  ``name`` labels the rows (``name line N``) in errors.
    """
    data = source if isinstance(source, str | bytes) else source.read()
    text = _decode(data, name) if isinstance(data, bytes) else data.removeprefix("\ufeff")
    offset = 0
    if text.startswith("#TYPE"):
        text = text.partition("\n")[2]
        offset = 1
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    names: dict[str, str] = {}
    rows: list[CsvRow] = []
    start = offset + 1
    try:
        for record in reader:
            where = "%s line %d" % (name, start)
            start = offset + reader.line_num + 1
            if not record or record == [""]:
                continue
            if header is None:
                header = record
                columns = _resolve_columns(header, where)
                names = {c: header[i].strip() for c, i in columns.items()}
                continue
            if len(record) != len(header):
                raise InvalidValue(
                    where,
                    ",".join(record),
                    "has %d cell(s) where the header has %d" % (len(record), len(header)),
                )
            rows.append(CsvRow(where, {c: record[i].strip() for c, i in columns.items()}, names))
    except csv.Error as exc:
        raise InvalidValue("file", name, "is not valid CSV at line %d: %s" % (start, exc)) from None
    if header is None:
        raise InvalidValue(
            "file", name, "has no header row (expected %s)" % ",".join(EXPORT_COLUMNS)
        )
    return rows


def write_csv(rows: Iterable[Mapping[str, str]], out: IO[str]) -> None:
    """Write rows of ``EXPORT_COLUMNS`` as CSV with a header; ``read_csv`` reads it back."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([row.get(c, "") for c in EXPORT_COLUMNS])
