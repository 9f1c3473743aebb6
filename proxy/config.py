"""Daemon configuration: a TOML file validated whole by pydantic.

Every setting has a default, so ``pcproxy serve`` runs with no file at all on
loopback ports and a SQLite table in the current directory; ``config/pcproxy.toml``
is the commented example of every key.  A file that fails validation is
reported field by field (``server.listen[0]: ...``) and nothing starts.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.tls import TlsSettings

Transport = Literal["udp", "tcp", "tls"]
Mode = Literal["redirect", "proxy"]
LogLevel = Literal["debug", "info", "warning", "error"]

DEFAULT_LISTEN = ("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060", "udp:[::1]:5060", "tcp:[::1]:5060")


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field."""


def split_host_port(text: str) -> tuple[str, str]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port as written; "" when absent).

    The one reading of an address with a port that listeners, name servers,
    the metrics listener and ``pcproxy ping`` share; each checks its parts.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, _, port = text.rpartition(":")
    return host, port


class ListenAddress(BaseModel):
    """One listening socket: ``udp:HOST:PORT``, ``tcp:[V6]:PORT``."""

    model_config = ConfigDict(frozen=True)

    transport: Transport
    host: str
    port: int

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        return cls._split(value) if isinstance(value, str) else value

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        return cls.model_validate(cls._split(text))

    @staticmethod
    def _split(text: str) -> dict[str, object]:
        transport, sep, hostport = text.partition(":")
        if not sep or transport.lower() not in ("udp", "tcp", "tls"):
            raise ValueError("expected udp:HOST:PORT or tcp:HOST:PORT, got %r" % text)
        host, portstr = split_host_port(hostport)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("%r: host must be an IP address, got %r" % (text, host)) from None
        if not portstr.isdigit() or not 0 <= int(portstr) < 65536:
            raise ValueError("%r: port must be 0-65535, got %r" % (text, portstr))
        return {"transport": transport.lower(), "host": host, "port": int(portstr)}

    def __str__(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%s:%d" % (self.transport, host, self.port)


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: list[ListenAddress] = Field(
        default_factory=lambda: [ListenAddress.parse(v) for v in DEFAULT_LISTEN], min_length=1
    )
    mode: Mode = "proxy"
    server_name: str = "pcproxy.invalid"
    drain_timeout: Annotated[float, Field(ge=0.0, le=300.0)] = 5.0
    #: Worker processes sharing the listening ports (``proxy.workers``);
    #: 0: one per CPU core available to the process.
    workers: Annotated[int, Field(ge=0, le=256)] = 0


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Path("pcproxy.db")
    poll_interval: Annotated[float, Field(gt=0.0, le=10.0)] = 0.25


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: LogLevel = "info"


class SipSettings(BaseModel):
    """RFC 3261 timer values (§17.1.1.1) and input bounds."""

    model_config = ConfigDict(extra="forbid")

    t1: Annotated[float, Field(gt=0.0, le=10.0)] = 0.5
    t2: Annotated[float, Field(gt=0.0, le=60.0)] = 4.0
    t4: Annotated[float, Field(gt=0.0, le=60.0)] = 5.0
    max_message_size: Annotated[int, Field(ge=1024, le=1 << 20)] = 65535
    max_headers: Annotated[int, Field(ge=16, le=1024)] = 128
    max_tcp_connections: Annotated[int, Field(ge=1)] = 4096
    tcp_idle_timeout: Annotated[float, Field(gt=0.0)] = 600.0


class ProxySettings(BaseModel):
    """Stateful proxy mode (RFC 3261 §16) and failover (RFC 3263 §4.3)."""

    model_config = ConfigDict(extra="forbid")

    record_route: bool = True
    target_timeout: Annotated[float, Field(gt=0.0, le=60.0)] = 2.0
    failure_ttl: Annotated[float, Field(ge=0.0, le=3600.0)] = 30.0
    default_port: Annotated[int, Field(ge=1, le=65535)] = 5041
    default_transport: Transport = "tls"
    retry_after: Annotated[int, Field(ge=0, le=3600)] = 5
    secret_file: Path | None = None


#: Loopback, the RFC 1918 private networks, IPv6 unique local (RFC 4193) and
#: link-local addresses: where Front End servers of an internal network are.
DEFAULT_TRUSTED_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


class SecuritySettings(BaseModel):
    """The trust boundary: who may send to pcproxy and how fast (``proxy.admission``)."""

    model_config = ConfigDict(extra="forbid")

    trusted_networks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TRUSTED_NETWORKS), min_length=1
    )
    #: High enough that a Front End carrying every client's requests is never
    #: limited; a flood beyond what one process can serve is shed before parsing.
    rate: Annotated[float, Field(ge=0.0)] = 10000.0
    burst: Annotated[int, Field(ge=1)] = 20000
    max_connections_per_source: Annotated[int, Field(ge=1)] = 64

    @field_validator("trusted_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        out = []
        for i, text in enumerate(value):
            try:
                out.append(str(ipaddress.ip_network(text, strict=True)))
            except ValueError as exc:
                raise ValueError(
                    "[%d] %r: not a network in CIDR form, e.g. 10.0.0.0/8 (%s)" % (i, text, exc)
                ) from None
        return out


def parse_nameserver(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (IPv6 in brackets) -> (address, port)."""
    if text.startswith("[") or text.count(":") == 1:
        host, port = split_host_port(text)
    else:  # a bare name or IPv6 address: port 53
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("%r: nameserver must be an IP address, got %r" % (text, host)) from None
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError("%r: port must be 1-65535, got %r" % (text, port))
    return host, int(port) if port else 53


class DnsSettings(BaseModel):
    """The resolver that finds pool servers (RFC 3263, RFC 2782, RFC 8767)."""

    model_config = ConfigDict(extra="forbid")

    nameservers: list[str] = Field(default_factory=list)
    timeout: Annotated[float, Field(gt=0.0, le=30.0)] = 2.0
    lifetime: Annotated[float, Field(gt=0.0, le=60.0)] = 4.0
    cache_size: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    max_stale: Annotated[float, Field(ge=0.0)] = 86400.0

    @field_validator("nameservers")
    @classmethod
    def _valid_nameservers(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_nameserver(text)
        return value

    def endpoints(self) -> list[tuple[str, int]]:
        return [parse_nameserver(text) for text in self.nameservers]


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IP address, IPv6 in brackets; port 0-65535) -> (host, port)."""
    host, port = split_host_port(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            "%r: expected HOST:PORT with an IP address, got %r" % (text, host)
        ) from None
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("%r: port must be 0-65535, got %r" % (text, port))
    return host, int(port)


class MetricsSettings(BaseModel):
    """The HTTP listener of /metrics, /healthz and /readyz."""

    model_config = ConfigDict(extra="forbid")

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        if value:
            parse_hostport(value)
        return value

    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when metrics are off."""
        return parse_hostport(self.listen) if self.listen else None


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    table: TableSettings = Field(default_factory=TableSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    sip: SipSettings = Field(default_factory=SipSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)


def read_toml(path: Path) -> dict[str, object]:
    """The file's TOML table; ConfigError says why it cannot be had."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError("cannot read: %s" % exc.strerror) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("not valid TOML: %s" % exc) from None


def load_settings(path: Path | None) -> Settings:
    """Read and validate a config file (``None``: the built-in defaults)."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = read_toml(path)
        except ConfigError as exc:
            raise ConfigError("%s: %s" % (path, exc)) from None
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("%s: %s" % (path or "defaults", describe(exc))) from None


def describe(exc: ValidationError) -> str:
    """One line per invalid field, e.g. ``server.listen[0]: port must be ...``."""
    lines = []
    for err in exc.errors():
        where = ""
        for part in err["loc"]:
            where += "[%d]" % part if isinstance(part, int) else ("." if where else "") + str(part)
        msg = err["msg"].removeprefix("Value error, ")
        lines.append("%s: %s" % (where or "(top level)", msg))
    return "; ".join(lines)
