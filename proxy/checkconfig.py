"""``pcproxy check-config``: everything about a configuration that can be known
without starting the daemon.

Theory of operation.  The file is read as TOML, then each section is
validated by its own pydantic model, so one run reports the problems of every
section rather than the first; each problem is one line naming the field path
and the value (``server.listen[0]: port must be 0-65535, got '99999'``).  A
section that validates is then checked against the machine: listen sockets
that collide, the TLS material loaded exactly as the daemon loads it
(``proxy.tls``: files readable, certificate and key matching, CA bundle
parsing), the endpoint table opened read-only (its schema version known, its
directory writable for SQLite's WAL files), ``[proxy] secret_file`` readable
and long enough.  Nothing is bound, created or written.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from proxy import tls
from proxy.config import (
    ConfigError,
    ListenAddress,
    ProxySettings,
    ServerSettings,
    Settings,
    TableSettings,
    read_toml,
)
from proxy.server import read_secret
from proxy.store import SCHEMA_VERSION

MIN_SECRET = 16
"""Bytes ``read_secret`` asks of ``[proxy] secret_file``."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong: ``field`` is the dotted path (``server.listen[0]``)."""

    field: str
    message: str

    def __str__(self) -> str:
        return "%s: %s" % (self.field, self.message)


@dataclass(frozen=True, slots=True)
class TableState:
    """What the table file holds: ``None`` schema and count when not created yet."""

    path: Path
    schema_version: int | None
    endpoints: int | None


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome: ``settings`` and ``table`` are set when nothing is wrong."""

    source: str
    problems: list[Problem]
    settings: Settings | None = None
    table: TableState | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


def check_config(path: Path | None) -> Report:
    """Check the file at ``path`` (``None``: the built-in defaults)."""
    source = str(path) if path is not None else "defaults"
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = read_toml(path)
        except ConfigError as exc:
            return Report(source, [Problem("(file)", str(exc))])
    problems: list[Problem] = []
    sections: dict[str, BaseModel] = {}
    problems += [_unknown(name, Settings) for name in data if name not in Settings.model_fields]
    for name, field in Settings.model_fields.items():
        model = typing.cast(type[BaseModel], field.annotation)
        try:
            sections[name] = model.model_validate(data.get(name, {}))
        except ValidationError as exc:
            problems += validation_problems(exc, prefix=(name,), model=model)
    if "server" in sections:
        problems += check_listen(typing.cast(ServerSettings, sections["server"]).listen)
    if "tls" in sections:
        server = sections.get("server")
        listen = typing.cast(ServerSettings, server).listen if server is not None else []
        problems += check_tls(typing.cast(tls.TlsSettings, sections["tls"]), listen)
    if "proxy" in sections:
        problems += check_secret(typing.cast(ProxySettings, sections["proxy"]).secret_file)
    table = None
    if "table" in sections:
        table, found = check_table(typing.cast(TableSettings, sections["table"]).path)
        problems += found
    if problems:
        return Report(source, problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:  # a rule across sections
        return Report(source, validation_problems(exc, prefix=(), model=Settings))
    return Report(source, [], settings, table)


# pydantic's errors ---------------------------------------------------------------------
def validation_problems(
    exc: ValidationError, *, prefix: Sequence[str | int], model: type[BaseModel]
) -> list[Problem]:
    """One ``Problem`` per pydantic error, naming the field, the value and,
    for an unknown key, the keys that are known there."""
    problems = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        where = _path(loc)
        if err["type"] == "extra_forbidden":
            inner = _model_at(model, tuple(err["loc"][:-1]))
            known = sorted(inner.model_fields) if inner is not None else []
            message = "unknown key"
            if known:
                message += " (known keys: %s)" % ", ".join(known)
            problems.append(Problem(where, message))
            continue
        message = err["msg"].removeprefix("Value error, ")
        shown = _show(err.get("input"))  # pcproxy's own validators name the value
        if shown is not None and err["type"] != "value_error" and shown not in message:
            message += ", got %s" % shown
        problems.append(Problem(where or "(top level)", message))
    return problems


def _unknown(name: str, model: type[BaseModel]) -> Problem:
    known = ", ".join("[%s]" % key for key in model.model_fields)
    return Problem(name, "unknown section (known sections: %s)" % known)


def _path(loc: Sequence[str | int]) -> str:
    where = ""
    for part in loc:
        where += "[%d]" % part if isinstance(part, int) else ("." if where else "") + str(part)
    return where


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that validates the value at ``loc`` inside ``model``."""
    current: object = model
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _show(value: object) -> str | None:
    if isinstance(value, Mapping):
        return None
    text = "'%s'" % value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# checks against the machine ---------------------------------------------------------------
def check_listen(listen: Sequence[ListenAddress]) -> list[Problem]:
    """Two listeners on one socket: the daemon could not bind the second.

    ``tcp:`` and ``tls:`` both take a TCP port; port 0 always picks a free one.
    """
    problems = []
    taken: dict[tuple[str, str, int], int] = {}
    for index, spec in enumerate(listen):
        if spec.port == 0:
            continue
        kind = "udp" if spec.transport == "udp" else "tcp"
        key = (kind, ipaddress.ip_address(spec.host).compressed, spec.port)
        if key in taken:
            first = taken[key]
            problems.append(
                Problem(
                    "server.listen[%d]" % index,
                    "'%s' takes the same %s socket as server.listen[%d] '%s'"
                    % (spec, kind.upper(), first, listen[first]),
                )
            )
        else:
            taken[key] = index
    return problems


def check_tls(settings: tls.TlsSettings, listen: Sequence[ListenAddress]) -> list[Problem]:
    """Build the contexts the daemon builds at start (``proxy.tls``): the
    server context when a ``tls:`` listener exists, the client context always."""
    messages: dict[str, None] = {}
    builders = [tls.client_context]
    if any(spec.transport == "tls" for spec in listen):
        builders.insert(0, tls.server_context)
    for build in builders:
        try:
            build(settings)
        except tls.TlsConfigError as exc:
            messages[str(exc)] = None
    problems = []
    for message in messages:
        field, sep, rest = message.partition(": ")
        problems.append(Problem(field, rest) if sep else Problem("tls", message))
    return problems


def check_secret(path: Path | None) -> list[Problem]:
    """``[proxy] secret_file`` as the daemon reads it (``read_secret``)."""
    if path is None:
        return []
    try:
        read_secret(path)
    except IsADirectoryError:
        return [Problem("proxy.secret_file", "'%s' is a directory, not a file" % path)]
    except OSError as exc:
        return [Problem("proxy.secret_file", "'%s' cannot be read: %s" % (path, exc.strerror))]
    except ValueError:
        size = len(path.read_bytes().strip())
        return [
            Problem(
                "proxy.secret_file",
                "'%s' holds %d bytes; a secret needs at least %d" % (path, size, MIN_SECRET),
            )
        ]
    return []


def check_table(path: Path) -> tuple[TableState | None, list[Problem]]:
    """The endpoint table opened read-only: a pcproxy table of a schema this
    version knows, in a directory SQLite may write its WAL files to.  A file
    not there yet is fine: ``pcproxy serve`` and ``endpoint new`` create it."""
    parent = path.parent
    if not parent.is_dir():
        return None, [Problem("table.path", "'%s': no directory %s" % (path, parent))]
    if not os.access(parent, os.W_OK | os.X_OK):
        return None, [
            Problem(
                "table.path",
                "'%s': directory %s is not writable (SQLite writes its WAL files there)"
                % (path, parent),
            )
        ]
    if not path.exists():
        return TableState(path, None, None), []
    if not path.is_file():
        return None, [Problem("table.path", "'%s' is not a file" % path)]
    if not os.access(path, os.R_OK | os.W_OK):
        return None, [Problem("table.path", "'%s' is not readable and writable" % path)]
    try:
        db = sqlite3.connect("file:%s?mode=ro" % quote(str(path.resolve())), uri=True)
    except sqlite3.Error as exc:
        return None, [Problem("table.path", "'%s' cannot be opened: %s" % (path, exc))]
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            problem = "has schema version %d, newer than this pcproxy knows (%d)" % (
                version,
                SCHEMA_VERSION,
            )
            return None, [Problem("table.path", "'%s' %s" % (path, problem))]
        if version == 0:
            if db.execute("SELECT 1 FROM sqlite_master").fetchone():
                problem = "is an SQLite file but not a pcproxy table"
                return None, [Problem("table.path", "'%s' %s" % (path, problem))]
            return TableState(path, 0, 0), []
        count = int(db.execute("SELECT COUNT(*) FROM endpoint").fetchone()[0])
    except sqlite3.Error as exc:
        return None, [Problem("table.path", "'%s' cannot be read: %s" % (path, exc))]
    finally:
        db.close()
    return TableState(path, version, count), []


# the summary ---------------------------------------------------------------------------
def summary(report: Report) -> list[str]:
    """The lines ``check-config`` prints for a valid configuration."""
    settings, table = report.settings, report.table
    assert settings is not None and table is not None
    if table.schema_version is None:
        held = "not created yet: serve or endpoint new creates it"
    else:
        held = "schema %d, %d endpoint(s)" % (table.schema_version, table.endpoints or 0)
    certificate = settings.tls.certificate
    return [
        "%s: valid" % report.source,
        "listeners: %s" % ", ".join(str(spec) for spec in settings.server.listen),
        "mode:      %s" % settings.server.mode,
        "table:     %s (%s)" % (table.path.absolute(), held),
        "dns:       %s" % (", ".join(settings.dns.nameservers) or "from /etc/resolv.conf"),
        "tls:       %s" % (certificate if certificate is not None else "no certificate"),
    ]
