"""TLS for SIP: contexts, peer identity and certificate reload.

RFC 3261 §26.3.1 asks a proxy to support TLS with both one-way and mutual
authentication.  pcproxy accepts TLS from Front End servers on its listeners
(:func:`server_context`, optionally requiring a client certificate) and opens
mutual TLS towards Persistent Chat pool servers (:func:`client_context`).  This
module builds the ``ssl.SSLContext`` objects and decides who a peer is; the
transport layer owns the sockets, the handshakes and their failure counters.

Identity follows RFC 5922.  Towards a pool the client context relies on the
``ssl`` module's ``check_hostname``, which matches the pool FQDN against the DNS
subjectAltName entries only: that is how Lync and Skype for Business pool
certificates are issued, with the pool FQDN as a DNS name.  On a listener,
:func:`peer_allowed` applies the ``allowed_peers`` list with the RFC 5922 rules
themselves: :func:`certificate_names` finds the SIP domain identities in the
peer's certificate (§7.1) and :func:`identity_matches` compares them (§7.2).

A certificate renewed on disk is picked up without dropping connections.
:class:`ServerContexts` hands the listeners one fixed ``base_context`` whose
``sni_callback`` switches every new handshake to the newest context: OpenSSL
calls it for each ClientHello, with or without SNI.  An established connection
keeps the context it was made with.  Only the certificate, key and CA bundle
are taken from that newest context; the peer verification mode and the lowest
protocol version are fixed when the SSL object is created from the base
context, so changing ``require_client_certificate`` or ``min_version`` needs a
restart and :meth:`ServerContexts.reload` refuses it.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class TlsConfigError(Exception):
    """TLS material that cannot be used; the message names the setting and the file."""


def _dns_name(value: str) -> str:
    name = _normalise(value)
    if name is None or not _is_hostname(name):
        raise ValueError("not a DNS name: %r" % value)
    return name


class TlsSettings(BaseModel):
    """The ``[tls]`` section of the daemon configuration.

    ``certificate`` is pcproxy's own PEM chain, served on TLS listeners and
    presented as client certificate to pools (RFC 3261 §26.3.1 mutual TLS).
    ``ca_bundle`` verifies peers; ``None`` means the system's default CAs.
    ``allowed_peers`` names the peers (RFC 5922 §7.2 exact DNS names) accepted
    on listeners when client certificates are required; empty accepts any
    certificate the CAs validate.
    """

    model_config = ConfigDict(extra="forbid")

    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    verify_server: bool = True
    require_client_certificate: bool = False
    allowed_peers: list[Annotated[str, AfterValidator(_dns_name)]] = []
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if self.certificate is not None and self.private_key is None:
            raise ValueError("private_key is required when certificate is set")
        if self.private_key is not None and self.certificate is None:
            raise ValueError("certificate is required when private_key is set")
        if self.allowed_peers and not self.require_client_certificate:
            raise ValueError(
                "allowed_peers needs require_client_certificate = true:"
                " without a client certificate there is no name to check"
            )
        return self


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context of a TLS listener (RFC 3261 §26.3.1).

    pcproxy's certificate and key are required.  With
    ``require_client_certificate`` the peer must present a certificate that
    ``ca_bundle`` (or the system CAs) validates.
    """
    if settings.certificate is None or settings.private_key is None:
        raise TlsConfigError("tls.certificate: a TLS listener needs a certificate and private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    _load_identity(context, settings.certificate, settings.private_key)
    if settings.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_trust(context, settings.ca_bundle, ssl.Purpose.CLIENT_AUTH)
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context for connections to pool servers (RFC 3261 §26.3.1, RFC 5922 §7.3).

    pcproxy's certificate is presented when configured (mutual TLS).  With
    ``verify_server`` the pool's chain is verified and its DNS subjectAltName
    must match the ``server_hostname`` given to the connection, the pool FQDN.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[settings.min_version]
    if settings.certificate is not None and settings.private_key is not None:
        _load_identity(context, settings.certificate, settings.private_key)
    if settings.verify_server:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        _load_trust(context, settings.ca_bundle, ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def certificate_names(cert: Mapping[str, object]) -> list[str]:
    """The SIP domain identities of a certificate, per RFC 5922 §7.1.

    ``cert`` is what ``SSLObject.getpeercert()`` returns.  The identities are
    the host parts of subjectAltName URIs of scheme ``sip`` without a user part.
    Only when there is none, the subjectAltName DNS names; only when the
    certificate has no subjectAltName at all, a subject CN that is a DNS name.
    A SIP URI whose host is not a host name (``sip:*.example.com``) gives no
    identity, so a wildcard in the result always comes from a DNS name or CN.
    Names are lower-cased, without a trailing dot, in certificate order.
    """
    san = cert.get("subjectAltName")
    if san is None:
        return _unique(
            name
            for key, value in _pairs(_flatten(cert.get("subject", ())))
            if key == "commonName"
            for name in [_normalise(value)]
            if name is not None and _is_hostname(name, wildcard=True)
        )
    entries = _pairs(san)
    sip = _unique(
        host
        for key, value in entries
        if key == "URI"
        for host in [_sip_uri_host(value)]
        if host is not None
    )
    if sip:
        return sip
    return _unique(
        name
        for key, value in entries
        if key == "DNS"
        for name in [_normalise(value)]
        if name is not None and _is_hostname(name, wildcard=True)
    )


def identity_matches(names: Iterable[str], domain: str, *, allow_wildcards: bool = False) -> bool:
    """Whether one of ``names`` is ``domain`` as RFC 5922 §7.2 compares identities.

    The comparison is of whole DNS names, case-insensitive, with no suffix
    match.  RFC 5922 §7.2 forbids wildcards: ``*.example.com`` matches only
    ``*.example.com``.  ``allow_wildcards`` relaxes that for certificates issued
    the HTTPS way (RFC 6125 §6.4.3): a leading ``*`` label stands for exactly
    one label, and never below a two-label name.  Names from
    :func:`certificate_names` carry a wildcard only when it came from a DNS
    name, so SIP URI identities are always compared exactly.
    """
    wanted = _normalise(domain)
    if wanted is None:
        return False
    for candidate in names:
        name = _normalise(candidate)
        if name is None:
            continue
        if name == wanted:
            return True
        if allow_wildcards and name.startswith("*.") and name.count(".") >= 2:
            _, dot, parent = wanted.partition(".")
            if dot and parent == name[2:]:
                return True
    return False


def peer_allowed(cert: Mapping[str, object] | None, settings: TlsSettings) -> bool:
    """Whether a listener accepts the peer that presented ``cert`` (RFC 5922 §7.2).

    Without ``require_client_certificate`` every peer is accepted.  With it, the
    peer needs a certificate (already validated by the handshake) and, when
    ``allowed_peers`` is set, one of its SIP domain identities must be listed.
    """
    if not settings.require_client_certificate:
        return True
    if not cert:
        return False
    if not settings.allowed_peers:
        return True
    names = certificate_names(cert)
    return any(identity_matches(names, peer) for peer in settings.allowed_peers)


class ServerContexts:
    """The listeners' server context, replaceable without dropping connections.

    Listeners are created once with :attr:`base_context`; each new handshake is
    switched to :attr:`current` by the SNI callback, so a reload takes effect
    for the next connection and established connections keep theirs.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        self._current = server_context(settings)
        self._base = server_context(settings)
        self._base.sni_callback = self._select

    @property
    def base_context(self) -> ssl.SSLContext:
        """The context to give ``create_server(ssl=...)``; it never changes."""
        return self._base

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use."""
        return self._current

    @property
    def settings(self) -> TlsSettings:
        """The settings :attr:`current` was built from, ``allowed_peers`` included."""
        return self._settings

    def reload(self, settings: TlsSettings) -> None:
        """Build a context from ``settings`` and make it current.

        On :class:`TlsConfigError` the current context stays in use.  The
        certificate files are read again even when their paths are unchanged,
        which is how a renewed certificate is taken up.
        """
        for field in ("require_client_certificate", "min_version"):
            if getattr(settings, field) != getattr(self._settings, field):
                raise TlsConfigError("tls.%s: cannot change on reload, only on restart" % field)
        context = server_context(settings)
        self._current = context
        self._settings = settings

    def _select(self, conn: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        conn.context = self._current


def _load_identity(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    _readable("tls.certificate", certificate)
    _readable("tls.private_key", private_key)
    _parse_certificates("tls.certificate", certificate)

    def no_password() -> str:
        raise TlsConfigError(
            "tls.private_key: %s: the key is encrypted; pcproxy needs it unencrypted" % private_key
        )

    try:
        context.load_cert_chain(certificate, private_key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                "tls.private_key: %s does not match the certificate in %s"
                % (private_key, certificate)
            ) from None
        raise TlsConfigError(
            "tls.private_key: %s: not a PEM private key (%s)" % (private_key, exc.reason)
        ) from None


def _load_trust(context: ssl.SSLContext, ca_bundle: Path | None, purpose: ssl.Purpose) -> None:
    if ca_bundle is None:
        context.load_default_certs(purpose)
        return
    _readable("tls.ca_bundle", ca_bundle)
    _parse_certificates("tls.ca_bundle", ca_bundle, context)


def _readable(setting: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise TlsConfigError("%s: %s: file not found" % (setting, path)) from None
    except IsADirectoryError:
        raise TlsConfigError("%s: %s: is a directory, not a PEM file" % (setting, path)) from None
    except OSError as exc:
        raise TlsConfigError("%s: %s: cannot read: %s" % (setting, path, exc.strerror)) from None


def _parse_certificates(setting: str, path: Path, into: ssl.SSLContext | None = None) -> None:
    store = into if into is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        store.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            "%s: %s: no PEM certificate could be read (%s)" % (setting, path, exc.reason)
        ) from None
    except OSError as exc:
        raise TlsConfigError("%s: %s: cannot read: %s" % (setting, path, exc.strerror)) from None


def _sip_uri_host(uri: str) -> str | None:
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != "sip" or "@" in rest:
        return None
    hostport = re.split(r"[;?]", rest, maxsplit=1)[0]
    if hostport.startswith("["):
        return None
    host = _normalise(hostport.partition(":")[0])
    return host if host is not None and _is_hostname(host) else None


def _normalise(name: str) -> str | None:
    name = name.strip().removesuffix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name.lower() or None


def _is_hostname(name: str, *, wildcard: bool = False) -> bool:
    labels = name.split(".")
    if wildcard and len(labels) > 1 and labels[0] == "*":
        labels = labels[1:]
    return len(name) <= 253 and all(_LABEL.match(label) for label in labels)


def _flatten(rdns: object) -> object:
    if isinstance(rdns, tuple):
        return tuple(pair for rdn in rdns if isinstance(rdn, tuple) for pair in rdn)
    return ()


def _pairs(entries: object) -> list[tuple[str, str]]:
    if not isinstance(entries, tuple):
        return []
    return [
        (entry[0], entry[1])
        for entry in entries
        if isinstance(entry, tuple)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
    ]


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
