"""The ``pcproxy`` command line.

``pcproxy endpoint`` manages the endpoint table the way Lync's
``*-CsPersistentChatEndpoint`` cmdlets do; the validation and SQL live in
``proxy.store``, this module only parses options and prints.  Every user error
leaves as one line on stderr, ``pcproxy: error: <field> '<value>' <problem>``:
exit status 2 for bad input, 1 when the table refuses (unknown identity,
duplicate SIP address, database locked or unusable).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sqlite3
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from click.exceptions import NoArgsIsHelpError
from pydantic import ValidationError
from tabulate import tabulate

from proxy import __version__, explain
from proxy.checkconfig import check_config, summary
from proxy.config import (
    ConfigError,
    DnsSettings,
    ListenAddress,
    MetricsSettings,
    Settings,
    describe,
    load_settings,
)
from proxy.log import configure as configure_logging
from proxy.server import read_secret, serve
from proxy.sip.errors import UriError
from proxy.store import (
    UNSET,
    Endpoint,
    EndpointStore,
    InvalidValue,
    StoreError,
    parse_mode,
    parse_port,
    parse_transport,
    read_csv,
    write_csv,
)
from proxy.transport.ping import ping, split_hostport
from proxy.workers import as_bound, supervise, worker_count

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable[..., Any])

_TABLE_HEADERS = (
    "SipAddress",
    "PoolFqdn",
    "DisplayName",
    "Mode",
    "PoolPort",
    "PoolTransport",
    "Updated",
)


class _Failure(click.ClickException):
    """A user error, shown as one line without usage text or traceback."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo("pcproxy: error: %s" % self.format_message(), file=file, err=True)


class _BadInput(_Failure):
    exit_code = EXIT_BAD_INPUT


class _Refused(_Failure):
    exit_code = EXIT_REFUSED


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Map every user error to ``_BadInput`` (exit 2) or ``_Refused`` (exit 1)."""
    try:
        yield
    except (_Failure, NoArgsIsHelpError):
        raise
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "pcproxy"
        message = exc.format_message().rstrip(".")
        raise _BadInput("%s (see '%s --help')" % (message, command)) from None
    except (InvalidValue, UriError) as exc:
        raise _BadInput(str(exc)) from None
    except ConfigError as exc:
        raise _BadInput("--config %s" % exc) from None
    except StoreError as exc:
        raise _Refused(str(exc)) from None
    except sqlite3.Error as exc:
        raise _Refused("database: %s" % exc) from None
    except click.ClickException as exc:
        raise _Refused(exc.format_message()) from None


class _Cli(click.Group):
    """The top-level group: parse and command errors alike become one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def config_option(command: F) -> F:
    """``--config FILE``: the daemon's TOML settings (``proxy.config``)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="FILE",
        help="TOML settings file (default: none, built-in settings).",
    )(command)


def db_option(command: F) -> F:
    """``--db FILE`` (or ``$PCPROXY_DB``): overrides ``[table] path``."""
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="FILE",
        envvar="PCPROXY_DB",
        show_envvar=True,
        help="SQLite endpoint table (default: [table] path from --config, else ./pcproxy.db).",
    )(command)


def table_options(command: F) -> F:
    """``--config`` and ``--db``, taken by every verb that opens the endpoint table."""
    return config_option(db_option(command))


def _open_store(config: Path | None, db: Path | None) -> EndpointStore:
    settings = load_settings(config)
    return EndpointStore(db if db is not None else settings.table.path)


def _table(endpoints: Sequence[Endpoint]) -> str:
    rows = [
        (
            e.sip_address,
            e.pool_fqdn,
            e.display_name or "",
            e.mode or "inherit",
            "" if e.pool_port is None else str(e.pool_port),
            e.pool_transport or "",
            e.updated_at,
        )
        for e in endpoints
    ]
    return tabulate(rows, headers=_TABLE_HEADERS, disable_numparse=True)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcproxy")
def main() -> None:
    """pcproxy: legacy Group Chat SIP URIs served by a Persistent Chat pool.

    Clients of OCS 2007 R2 / Lync 2010 Group Chat keep calling one well-known
    URI such as sip:ocschat@contoso.com.  pcproxy plays the part of Lync's
    Persistent Chat endpoint: an endpoint table maps each legacy URI to a pool
    FQDN, and the SIP service redirects or proxies requests there.
    """


@main.command("serve")
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="TRANSPORT:HOST:PORT",
    help="Listen on udp:HOST:PORT, tcp:HOST:PORT or tls:HOST:PORT (repeatable; replaces "
    "[server] listen). "
    "IPv6 hosts in brackets: udp:[::1]:5060. Port 0 picks a free port.",
)
@click.option(
    "--mode",
    type=click.Choice(["redirect", "proxy"]),
    help="Default for endpoints that do not set a mode (replaces [server] mode).",
)
@click.option(
    "--nameserver",
    "nameservers",
    multiple=True,
    metavar="HOST:PORT",
    help="DNS server that locates pools (repeatable; replaces [dns] nameservers). "
    "Default: /etc/resolv.conf.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="JSON log lines on stdout at this level (replaces [log] level).",
)
@click.option(
    "--metrics",
    "metrics_listen",
    metavar="HOST:PORT",
    help="Serve /metrics, /healthz and /readyz over HTTP on HOST:PORT (replaces [metrics] listen); "
    "worker i of several serves on PORT + i.",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    metavar="N",
    help="Worker processes sharing the ports (replaces [server] workers). "
    "1: one process, no supervisor; 0: one per CPU core available (the default).",
)
@table_options
def serve_command(
    listen: tuple[str, ...],
    mode: str | None,
    nameservers: tuple[str, ...],
    log_level: str | None,
    metrics_listen: str | None,
    workers: int | None,
    config: Path | None,
    db: Path | None,
) -> None:
    """Run the SIP service in the foreground until SIGTERM or SIGINT.

    \b
    SIGHUP re-reads --config and applies what can change at run time: the
    endpoint table, TLS certificates, the log level; it logs which changed
    keys need a restart.  Changes made with 'pcproxy endpoint' are picked up
    within [table] poll_interval anyway.  SIGTERM/SIGINT drain (new requests
    get 503, in-flight transactions finish) and exit 0; a second one exits
    at once.  Under systemd (Type=notify) it reports READY, RELOADING and
    STOPPING on $NOTIFY_SOCKET.
    """
    settings = load_settings(config)
    overrides: dict[str, object] = {}
    if listen:
        try:
            overrides["listen"] = [ListenAddress.parse(text) for text in listen]
        except ValidationError as exc:
            raise _BadInput("--listen %s" % describe(exc)) from None
        except ValueError as exc:
            raise _BadInput("--listen %s" % exc) from None
    if mode is not None:
        overrides["mode"] = mode
    if workers is not None:
        overrides["workers"] = workers
    dns = settings.dns
    if nameservers:
        try:
            dns = DnsSettings.model_validate({**dns.model_dump(), "nameservers": list(nameservers)})
        except ValidationError as exc:
            raise _BadInput("--nameserver %s" % describe(exc)) from None
    metrics = None
    if metrics_listen is not None:
        try:
            metrics = MetricsSettings.model_validate({"listen": metrics_listen})
        except ValidationError as exc:
            raise _BadInput("--metrics %s" % describe(exc)) from None

    def with_options(file: Settings) -> Settings:
        """The command-line options over the file's values, at start and on SIGHUP."""
        return file.model_copy(
            update={
                "server": file.server.model_copy(update=overrides),
                "table": file.table.model_copy(update={"path": db}) if db else file.table,
                "log": file.log.model_copy(update={"level": log_level}) if log_level else file.log,
                "dns": file.dns.model_copy(update={"nameservers": dns.nameservers})
                if nameservers
                else file.dns,
                "metrics": metrics if metrics is not None else file.metrics,
            }
        )

    settings = with_options(settings)
    EndpointStore(settings.table.path).close()  # fails here, with one line, if unusable
    configure_logging(settings.log.level)
    count = worker_count(settings.server.workers)

    def load() -> Settings:
        return with_options(load_settings(config))

    if count == 1:
        code = serve(settings, load)
    else:
        try:
            secret = read_secret(settings.proxy.secret_file)
        except (OSError, ValueError) as exc:
            raise _Refused("[proxy] secret_file: %s" % exc) from None
        code = supervise(
            settings, count, lambda s, plan: serve(s, lambda: as_bound(load(), s), plan), secret
        )
    if code:
        raise SystemExit(code)


@main.command("ping")
@click.argument("target", metavar="HOST:PORT")
@click.option(
    "--transport", type=click.Choice(["udp", "tcp", "tls"]), default="udp", show_default=True
)
@click.option("--timeout", type=float, default=2.0, show_default=True, metavar="SECONDS")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="TLS: PEM CA bundle the server's certificate must chain to (default: system CAs).",
)
@click.option("--insecure", is_flag=True, help="TLS: do not verify the server's certificate.")
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="TLS: PEM certificate to present when the server asks for one (mutual TLS); "
    "its private key in the same file, or in --key.",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="TLS: PEM private key of --cert.",
)
def ping_command(
    target: str,
    transport: str,
    timeout: float,
    ca: Path | None,
    insecure: bool,
    cert: Path | None,
    key: Path | None,
) -> None:
    """Send OPTIONS to a running pcproxy; exit 0 if it answers 200.

    The container HEALTHCHECK uses it.  Any other answer, or none within
    --timeout, exits 1 with one line saying what happened.  Over TLS the
    server's certificate must name HOST (RFC 5922) unless --insecure; a
    listener that requires client certificates ([tls]
    require_client_certificate) is reached with --cert (and --key).
    """
    try:
        host, port = split_hostport(target)
    except ValueError as exc:
        raise _BadInput("HOST:PORT %s" % exc) from None
    context = None
    if transport == "tls":
        try:
            context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise _BadInput("--ca '%s' cannot be used: %s" % (ca, exc.strerror or exc)) from None
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if key is not None and cert is None:
            raise _BadInput("--key needs --cert")
        if cert is not None:
            what = "--cert '%s'" % cert + ("" if key is None else " with --key '%s'" % key)
            try:
                context.load_cert_chain(str(cert), None if key is None else str(key))
            except ssl.SSLError as exc:
                raise _BadInput(
                    "%s cannot be used: not a PEM certificate with its private key (%s)"
                    % (what, exc.reason or exc)
                ) from None
            except OSError as exc:
                raise _BadInput("%s cannot be used: %s" % (what, exc.strerror or exc)) from None
    elif ca is not None or insecure or cert is not None or key is not None:
        raise _BadInput("--ca, --insecure, --cert and --key need --transport tls")
    try:
        result = ping(host, port, transport, timeout, context=context)
    except TimeoutError:
        raise _Refused("%s: no answer within %gs" % (target, timeout)) from None
    except OSError as exc:
        raise _Refused("%s: %s" % (target, exc.strerror or exc)) from None
    click.echo("%s: %d %s in %.1f ms" % (target, result.status, result.reason, result.rtt_ms))
    if result.status != 200:
        raise SystemExit(EXIT_REFUSED)


@main.command("check-config")
@config_option
def check_config_command(config: Path | None) -> None:
    """Check a configuration file without starting the daemon.

    Beyond the keys and values: listen sockets that collide, the TLS
    certificate, key and CA bundle (loaded as the daemon loads them), the
    endpoint table (opened read-only: schema version, writable directory) and
    [proxy] secret_file.  Prints a short summary and exits 0 when all is well;
    else one line per problem, naming the field and the value, and exit 2.
    """
    report = check_config(config)
    if not report.valid:
        for problem in report.problems:
            click.echo("pcproxy: error: %s: %s" % (report.source, problem), err=True)
        raise SystemExit(EXIT_BAD_INPUT)
    click.echo("\n".join(summary(report)))


@main.command("explain")
@click.argument("uri", metavar="sip:URI")
@click.option(
    "--nameserver",
    "nameservers",
    multiple=True,
    metavar="HOST:PORT",
    help="DNS server to ask (repeatable; replaces [dns] nameservers).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-probe", is_flag=True, help="Do not send OPTIONS to the targets.")
@click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    help="Wait this long for each probe (default: [proxy] target_timeout).",
)
@table_options
def explain_command(
    uri: str,
    nameservers: tuple[str, ...],
    as_json: bool,
    no_probe: bool,
    timeout: float | None,
    config: Path | None,
    db: Path | None,
) -> None:
    """Show what the daemon does with a request for URI, and why.

    \b
    The endpoint the URI matches (user@host as the daemon compares it), the
    mode and where it comes from, the answer; then every DNS query of the
    RFC 3263 lookup with its answer or failure, the targets in the order
    pcproxy tries them, and whether each answers OPTIONS (skip with
    --no-probe).  Exit 0 when an endpoint matches, 1 when none does (the
    daemon answers 404), 2 for bad input.
    """
    settings = load_settings(config)
    if nameservers:
        try:
            dns = DnsSettings.model_validate(
                {**settings.dns.model_dump(), "nameservers": list(nameservers)}
            )
        except ValidationError as exc:
            raise _BadInput("--nameserver %s" % describe(exc)) from None
        settings = settings.model_copy(update={"dns": dns})
    path = db if db is not None else settings.table.path
    if not path.exists():
        raise _Refused("database '%s' does not exist (see 'pcproxy endpoint new')" % path)
    with EndpointStore(path) as store:
        snapshot = store.load_snapshot()
    explanation = explain.decide(snapshot, uri, settings, config)
    if explanation.found:

        async def look() -> None:
            targets = await explain.resolve(explanation, settings)
            if not no_probe:
                wait = timeout if timeout is not None else settings.proxy.target_timeout
                await explain.probe(explanation, targets, settings, wait)

        asyncio.run(look())
    if as_json:
        click.echo(json.dumps(explain.as_json(explanation), indent=2))
    else:
        click.echo("\n".join(explain.render_text(explanation)))
    if not explanation.found:
        raise SystemExit(EXIT_REFUSED)


@main.group()
def endpoint() -> None:
    """Manage the endpoint table (the *-CsPersistentChatEndpoint cmdlets).

    An IDENTITY is a SIP address (sip:ocschat@contoso.com, case-insensitive) or
    a display name (exact, case-insensitive).  Changes reach a running daemon
    within its poll interval; no restart is needed.

    \b
    Exit status: 0 done; 1 the table refused (unknown identity, duplicate SIP
    address, database locked or unusable); 2 bad input (malformed value,
    ambiguous identity, bad CSV file, bad option).
    """


@endpoint.command("new")
@click.option(
    "--sip-address",
    required=True,
    metavar="sip:USER@DOMAIN",
    help="The legacy URI clients call; unique regardless of case.",
)
@click.option(
    "--pool-fqdn",
    required=True,
    metavar="FQDN",
    help="Persistent Chat pool to send requests to, e.g. pcpool.contoso.com.",
)
@click.option("--display-name", metavar="TEXT", help="Name shown in listings.")
@click.option(
    "--mode",
    metavar="redirect|proxy",
    help="How to send requests to the pool (default: inherit [server] mode).",
)
@click.option("--pool-port", metavar="N", help="Pool SIP port 1-65535 (default: from DNS).")
@click.option(
    "--pool-transport",
    metavar="udp|tcp|tls",
    help="Pool transport (default: RFC 3263 selection).",
)
@table_options
def new_endpoint(
    sip_address: str,
    pool_fqdn: str,
    display_name: str | None,
    mode: str | None,
    pool_port: str | None,
    pool_transport: str | None,
    config: Path | None,
    db: Path | None,
) -> None:
    """Create an endpoint, like New-CsPersistentChatEndpoint.

    \b
    Lync:    New-CsPersistentChatEndpoint -SipAddress sip:ocschat@contoso.com
                 -PersistentChatPoolFqdn pcpool.contoso.com
    pcproxy: pcproxy endpoint new --sip-address sip:ocschat@contoso.com
                 --pool-fqdn pcpool.contoso.com
    """
    mode_value = parse_mode(mode or "", "--mode")
    port_value = parse_port(pool_port or "", "--pool-port")
    transport_value = parse_transport(pool_transport or "", "--pool-transport")
    with _open_store(config, db) as store:
        created = store.new(
            sip_address,
            pool_fqdn,
            display_name=display_name,
            mode=mode_value,
            pool_port=port_value,
            pool_transport=transport_value,
        )
    click.echo(_table([created]))


@endpoint.command("get")
@click.argument("identity", required=False)
@click.option(
    "--filter",
    "pattern",
    metavar="PATTERN",
    help="Wildcards (* and ?) matched against SIP address and display name, e.g. '*contoso*'.",
)
@click.option("--pool-fqdn", metavar="FQDN", help="Only endpoints homed on this pool.")
@click.option("--result-size", type=int, metavar="N", help="Show at most N endpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@table_options
def get_endpoints(
    identity: str | None,
    pattern: str | None,
    pool_fqdn: str | None,
    result_size: int | None,
    as_json: bool,
    config: Path | None,
    db: Path | None,
) -> None:
    """List endpoints, like Get-CsPersistentChatEndpoint.

    With no IDENTITY, lists all (ordered by SIP address).  An IDENTITY that
    matches nothing is an error (exit 1).  --filter, --pool-fqdn and
    --result-size mirror -Filter, -PersistentChatPoolFqdn and -ResultSize.
    """
    with _open_store(config, db) as store:
        found = store.get(identity, filter=pattern, pool_fqdn=pool_fqdn, result_size=result_size)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in found], indent=2))
    elif found:
        click.echo(_table(found))
    else:
        click.echo("no endpoints", err=True)


@endpoint.command("set")
@click.argument("identity")
@click.option("--pool-fqdn", metavar="FQDN", help="Move the endpoint to this pool.")
@click.option("--display-name", metavar="TEXT", help="New display name; '' removes it.")
@click.option(
    "--mode",
    metavar="redirect|proxy|inherit",
    help="'inherit' goes back to the daemon's [server] mode.",
)
@click.option("--pool-port", metavar="N|none", help="'none' goes back to the DNS choice.")
@click.option(
    "--pool-transport",
    metavar="udp|tcp|tls|none",
    help="'none' goes back to RFC 3263 selection.",
)
@table_options
def set_endpoint(
    identity: str,
    pool_fqdn: str | None,
    display_name: str | None,
    mode: str | None,
    pool_port: str | None,
    pool_transport: str | None,
    config: Path | None,
    db: Path | None,
) -> None:
    """Change some fields of one endpoint; the others keep their values.

    Lync has no Set cmdlet (there: Remove- then New-CsPersistentChatEndpoint);
    this keeps the endpoint's creation time and stamps Updated.  Give at least
    one option.

    \b
    To clear a field, give it the word for "not set":
      --mode inherit          use the daemon's [server] mode again
      --pool-port none        take the port from DNS (RFC 3263)
      --pool-transport none   let RFC 3263 choose the transport
      --display-name ''       no display name
    """
    with _open_store(config, db) as store:
        changed = store.set(
            identity,
            pool_fqdn=UNSET if pool_fqdn is None else pool_fqdn,
            display_name=UNSET if display_name is None else display_name,
            mode=UNSET if mode is None else parse_mode(mode, "--mode"),
            pool_port=UNSET if pool_port is None else parse_port(pool_port, "--pool-port"),
            pool_transport=(
                UNSET
                if pool_transport is None
                else parse_transport(pool_transport, "--pool-transport")
            ),
        )
    click.echo(_table([changed]))


@endpoint.command("remove")
@click.argument("identity", required=False)
@click.option("--pool-fqdn", metavar="FQDN", help="Remove every endpoint homed on this pool.")
@table_options
def remove_endpoints(
    identity: str | None, pool_fqdn: str | None, config: Path | None, db: Path | None
) -> None:
    """Remove one endpoint, or all of a pool's, like Remove-CsPersistentChatEndpoint.

    \b
    Lync:    Remove-CsPersistentChatEndpoint -Identity sip:ocschat@contoso.com
    pcproxy: pcproxy endpoint remove sip:ocschat@contoso.com
    Lync:    Get-CsPersistentChatEndpoint -PersistentChatPoolFqdn pcpool.contoso.com
                 | Remove-CsPersistentChatEndpoint
    pcproxy: pcproxy endpoint remove --pool-fqdn pcpool.contoso.com

    Give IDENTITY or --pool-fqdn, not both.
    """
    if (identity is None) == (pool_fqdn is None):
        raise click.UsageError("give IDENTITY or --pool-fqdn (exactly one)")
    with _open_store(config, db) as store:
        removed = [store.remove(identity)] if identity is not None else []
        if pool_fqdn is not None:
            removed = store.remove_pool(pool_fqdn)
    for e in removed:
        click.echo("removed %s (pool %s)" % (e.sip_address, e.pool_fqdn))


@endpoint.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--replace",
    is_flag=True,
    help="Make FILE the whole table (endpoints not in FILE are removed).",
)
@table_options
def import_endpoints(file: str, replace: bool, config: Path | None, db: Path | None) -> None:
    """Add the endpoints in a CSV FILE ('-' for stdin), all or none.

    Reads pcproxy's own export or the output of
    'Get-CsPersistentChatEndpoint | Export-Csv endpoints.csv' (UTF-8 or
    UTF-16 with BOM; the #TYPE line, Identity and other columns are ignored).
    Any bad row, or a SIP address already in the table or twice in FILE,
    imports nothing and names the line and column.
    """
    name = "<stdin>" if file == "-" else file
    try:
        with click.open_file(file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise _BadInput("FILE %r cannot be read: %s" % (name, exc.strerror)) from None
    rows = read_csv(data, name=name)
    with _open_store(config, db) as store:
        count = store.import_rows(rows, replace=replace)
    click.echo("imported %d endpoint(s)%s" % (count, " (table replaced)" if replace else ""))


@endpoint.command("export")
@table_options
def export_endpoints(config: Path | None, db: Path | None) -> None:
    """Write the table as CSV to stdout; 'pcproxy endpoint import' reads it back.

    Columns: SipAddress, PersistentChatPoolFqdn, DisplayName, Mode, PoolPort,
    PoolTransport (an empty cell means not set).
    """
    with _open_store(config, db) as store:
        rows = store.export_rows()
    out = io.StringIO()
    write_csv(rows, out)
    click.echo(out.getvalue(), nl=False)
