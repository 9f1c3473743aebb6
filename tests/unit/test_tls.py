"""TLS layer: settings, contexts, RFC 5922 identities and reload.

Certificates come from trustme; the one carrying a ``sip:`` URI subjectAltName,
which trustme cannot issue, is signed by the same CA with ``cryptography``.
Handshakes are real, over loopback, on ports chosen at run time.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from proxy.tls import (
    ServerContexts,
    TlsConfigError,
    TlsSettings,
    certificate_names,
    client_context,
    identity_matches,
    peer_allowed,
    server_context,
)

POOL = "pcpool.contoso.com"
FE = "fe1.contoso.com"
PeerCert = dict[str, object]


@dataclass(frozen=True)
class Pem:
    certificate: Path
    private_key: Path

    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.certificate.read_text())


@dataclass(frozen=True)
class Pki:
    ca: Path
    pool: Pem
    pool_renewed: Pem
    fe: Pem
    fe_sip: Pem
    stranger: Pem
    directory: Path


def _write(directory: Path, name: str, cert: trustme.LeafCert) -> Pem:
    pem = Pem(directory / ("%s.crt" % name), directory / ("%s.key" % name))
    cert.cert_chain_pems[0].write_to_path(str(pem.certificate))
    cert.private_key_pem.write_to_path(str(pem.private_key))
    return pem


def _issue_with_sip_uri(ca: trustme.CA, directory: Path, uri: str, dns: str) -> Pem:
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-an-identity")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), x509.DNSName(dns)]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = Pem(directory / "fe-sip.crt", directory / "fe-sip.key")
    pem.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return Pki(
        ca=directory / "ca.pem",
        pool=_write(directory, "pool", ca.issue_cert(POOL)),
        pool_renewed=_write(directory, "pool-renewed", ca.issue_cert(POOL)),
        fe=_write(directory, "fe", ca.issue_cert(FE)),
        fe_sip=_issue_with_sip_uri(ca, directory, "sip:%s" % FE, "fe-dns.contoso.com"),
        stranger=_write(directory, "stranger", trustme.CA().issue_cert(POOL)),
        directory=directory,
    )


def pool_settings(pki: Pki, **changes: object) -> TlsSettings:
    """A pool-side listener: pcproxy's pool certificate, client certificates required."""
    values: dict[str, object] = {
        "certificate": pki.pool.certificate,
        "private_key": pki.pool.private_key,
        "ca_bundle": pki.ca,
        "require_client_certificate": True,
    }
    values.update(changes)
    return TlsSettings.model_validate(values)


def fe_settings(pki: Pki, identity: Pem | None = None, **changes: object) -> TlsSettings:
    """pcproxy as TLS client: the FE certificate, pool verified against the test CA."""
    values: dict[str, object] = {"ca_bundle": pki.ca}
    if identity is not None:
        values.update(certificate=identity.certificate, private_key=identity.private_key)
    values.update(changes)
    return TlsSettings.model_validate(values)


@dataclass
class EchoServer:
    port: int
    peers: list[PeerCert | None] = field(default_factory=list)


@asynccontextmanager
async def echo_server(context: ssl.SSLContext) -> AsyncIterator[EchoServer]:
    """A line echo server on 127.0.0.1; ``peers`` records each handshaken peer's certificate."""
    state = EchoServer(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.peers.append(writer.get_extra_info("peercert"))
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def echo(self, line: bytes) -> bytes:
        self.writer.write(line + b"\n")
        await self.writer.drain()
        return (await asyncio.wait_for(self.reader.readline(), 1.0)).rstrip(b"\n")

    def server_certificate(self) -> bytes | None:
        conn: ssl.SSLObject = self.writer.get_extra_info("ssl_object")
        return conn.getpeercert(binary_form=True)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def connect(port: int, context: ssl.SSLContext, server_hostname: str = POOL) -> Client:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        1.0,
    )
    return Client(reader, writer)


async def echo_refused(port: int, context: ssl.SSLContext) -> bool:
    """Whether the server refuses this client, during the handshake or at the first read.

    With TLS 1.3 the client finishes its handshake before the server has seen
    the client's certificate, so a refusal may only show on the first read.
    """
    try:
        client = await connect(port, context)
        reply = await client.echo(b"hello")
    except (ConnectionError, ssl.SSLError):
        return True
    await client.close()
    return reply != b"hello"


# --- settings -------------------------------------------------------------------------------


def test_default_settings_have_no_certificate_and_verify_the_server() -> None:
    settings = TlsSettings()
    assert settings.certificate is None and settings.private_key is None
    assert settings.verify_server and not settings.require_client_certificate
    assert settings.min_version == "1.2"


@pytest.mark.parametrize(
    ("values", "field_named"),
    [
        ({"certificate": "a.crt"}, "private_key"),
        ({"private_key": "a.key"}, "certificate"),
        ({"allowed_peers": [FE]}, "require_client_certificate"),
    ],
)
def test_inconsistent_settings_are_rejected_naming_the_field(
    values: dict[str, object], field_named: str
) -> None:
    with pytest.raises(ValidationError, match=field_named):
        TlsSettings.model_validate(values)


def test_unknown_keys_and_versions_are_rejected() -> None:
    with pytest.raises(ValidationError, match="verify_peer"):
        TlsSettings.model_validate({"verify_peer": True})
    with pytest.raises(ValidationError, match="min_version"):
        TlsSettings.model_validate({"min_version": "1.1"})


def test_allowed_peers_must_be_dns_names_and_are_lower_cased() -> None:
    with pytest.raises(ValidationError, match="not a DNS name"):
        TlsSettings(require_client_certificate=True, allowed_peers=["fe 1.contoso.com"])
    settings = TlsSettings(require_client_certificate=True, allowed_peers=["FE1.Contoso.COM."])
    assert settings.allowed_peers == [FE]


# --- contexts -------------------------------------------------------------------------------


def test_client_context_verifies_the_pool_by_default(pki: Pki) -> None:
    context = client_context(fe_settings(pki))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_without_verification(pki: Pki) -> None:
    context = client_context(fe_settings(pki, verify_server=False, min_version="1.3"))
    assert not context.check_hostname and context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_server_context_requires_client_certificates_only_when_asked(pki: Pki) -> None:
    assert server_context(pool_settings(pki)).verify_mode == ssl.CERT_REQUIRED
    relaxed = pool_settings(pki, require_client_certificate=False)
    assert server_context(relaxed).verify_mode == ssl.CERT_NONE


def test_server_context_needs_a_certificate() -> None:
    with pytest.raises(TlsConfigError, match="tls.certificate"):
        server_context(TlsSettings())


def test_missing_certificate_file_is_named(pki: Pki) -> None:
    missing = pki.directory / "missing.crt"
    with pytest.raises(TlsConfigError) as caught:
        server_context(pool_settings(pki, certificate=missing))
    assert str(caught.value) == "tls.certificate: %s: file not found" % missing


def test_unreadable_key_file_is_named(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="tls.private_key: .*is a directory"):
        server_context(pool_settings(pki, private_key=pki.directory))


def test_bad_pem_certificate_is_named(pki: Pki) -> None:
    garbage = pki.directory / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError) as caught:
        server_context(pool_settings(pki, certificate=garbage))
    message = str(caught.value)
    assert message.startswith("tls.certificate: %s: no PEM certificate" % garbage)


def test_bad_pem_key_is_named(pki: Pki) -> None:
    with pytest.raises(TlsConfigError) as caught:
        server_context(pool_settings(pki, private_key=pki.pool.certificate))
    message = str(caught.value)
    assert message.startswith("tls.private_key: %s: not a PEM private key" % pki.pool.certificate)


def test_key_not_matching_certificate_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(TlsConfigError) as caught:
        client_context(
            fe_settings(pki, certificate=pki.fe.certificate, private_key=pki.pool.private_key)
        )
    assert str(caught.value) == "tls.private_key: %s does not match the certificate in %s" % (
        pki.pool.private_key,
        pki.fe.certificate,
    )


def test_encrypted_key_is_refused_without_prompting(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.pool.private_key.read_bytes(), password=None)
    encrypted = pki.directory / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError, match="tls.private_key: .*encrypted"):
        server_context(pool_settings(pki, private_key=encrypted))


def test_bad_ca_bundle_is_named(pki: Pki) -> None:
    with pytest.raises(
        TlsConfigError, match=re.escape("tls.ca_bundle: %s: no PEM" % pki.pool.private_key)
    ):
        client_context(fe_settings(pki, ca_bundle=pki.pool.private_key))


# --- RFC 5922 identities --------------------------------------------------------------------


def test_sip_uri_identities_come_first_and_exclude_dns_names() -> None:
    cert: PeerCert = {
        "subject": ((("commonName", "cn.contoso.com"),),),
        "subjectAltName": (
            ("DNS", "dns.contoso.com"),
            ("URI", "sip:Pool.Contoso.com"),
            ("URI", "sip:pool2.contoso.com:5061;transport=tls"),
        ),
    }
    assert certificate_names(cert) == ["pool.contoso.com", "pool2.contoso.com"]


def test_sip_uris_with_user_part_other_scheme_or_wildcard_are_not_identities() -> None:
    cert: PeerCert = {
        "subjectAltName": (
            ("URI", "sip:alice@contoso.com"),
            ("URI", "sips:secure.contoso.com"),
            ("URI", "https://web.contoso.com/"),
            ("URI", "sip:*.contoso.com"),
            ("DNS", "Dns.Contoso.com."),
            ("IP Address", "192.0.2.1"),
        ),
    }
    assert certificate_names(cert) == ["dns.contoso.com"]


def test_common_name_is_used_only_without_subject_alt_name() -> None:
    subject = ((("organizationName", "Contoso"),), (("commonName", "FE1.contoso.com"),))
    assert certificate_names({"subject": subject}) == [FE]
    assert certificate_names({"subject": subject, "subjectAltName": ()}) == []
    assert certificate_names({"subject": ((("commonName", "Contoso FE"),),)}) == []


def test_identities_compare_whole_names_case_insensitively() -> None:
    assert identity_matches(["pcpool.contoso.com"], "PCPool.Contoso.COM.")
    assert not identity_matches(["contoso.com"], POOL)
    assert not identity_matches([POOL], "contoso.com")
    assert not identity_matches([], POOL)


def test_wildcards_match_nothing_unless_allowed() -> None:
    assert not identity_matches(["*.contoso.com"], POOL)
    assert identity_matches(["*.contoso.com"], "*.contoso.com")
    assert identity_matches(["*.contoso.com"], POOL, allow_wildcards=True)
    assert not identity_matches(["*.contoso.com"], "a.pcpool.contoso.com", allow_wildcards=True)
    assert not identity_matches(["*.contoso.com"], "contoso.com", allow_wildcards=True)
    assert not identity_matches(["*.com"], "contoso.com", allow_wildcards=True)


def test_peer_allowed_applies_the_allow_list_only_to_required_certificates(pki: Pki) -> None:
    fe_cert: PeerCert = {"subjectAltName": (("DNS", FE),)}
    assert peer_allowed(None, pool_settings(pki, require_client_certificate=False))
    assert not peer_allowed(None, pool_settings(pki))
    assert not peer_allowed({}, pool_settings(pki))
    assert peer_allowed(fe_cert, pool_settings(pki))
    assert peer_allowed(fe_cert, pool_settings(pki, allowed_peers=["fe2.contoso.com", FE]))
    assert not peer_allowed(fe_cert, pool_settings(pki, allowed_peers=["fe2.contoso.com"]))


# --- handshakes -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mutual_tls_succeeds_and_the_listener_sees_the_client(pki: Pki) -> None:
    settings = pool_settings(pki, allowed_peers=[FE])
    async with echo_server(server_context(settings)) as server:
        client = await connect(server.port, client_context(fe_settings(pki, pki.fe)))
        assert await client.echo(b"INVITE") == b"INVITE"
        assert client.server_certificate() == pki.pool.der()
        await client.close()
    [peer] = server.peers
    assert peer is not None
    assert certificate_names(peer) == [FE]
    assert peer_allowed(peer, settings)


@pytest.mark.asyncio
async def test_sip_uri_certificate_identifies_the_client_by_its_domain(pki: Pki) -> None:
    settings = pool_settings(pki, allowed_peers=[FE])
    async with echo_server(server_context(settings)) as server:
        client = await connect(server.port, client_context(fe_settings(pki, pki.fe_sip)))
        assert await client.echo(b"OPTIONS") == b"OPTIONS"
        await client.close()
    [peer] = server.peers
    assert peer is not None
    assert certificate_names(peer) == [FE]
    assert peer_allowed(peer, settings)
    assert not peer_allowed(peer, pool_settings(pki, allowed_peers=["fe-dns.contoso.com"]))


@pytest.mark.asyncio
async def test_wrong_server_name_fails_verification(pki: Pki) -> None:
    async with echo_server(server_context(pool_settings(pki))) as server:
        context = client_context(fe_settings(pki, pki.fe))
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await connect(server.port, context, server_hostname="pcpool2.contoso.com")
    assert server.peers == []


@pytest.mark.asyncio
async def test_unknown_ca_fails_unless_verification_is_off(pki: Pki) -> None:
    stranger = pool_settings(
        pki,
        certificate=pki.stranger.certificate,
        private_key=pki.stranger.private_key,
        require_client_certificate=False,
    )
    async with echo_server(server_context(stranger)) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(server.port, client_context(fe_settings(pki)))
        client = await connect(server.port, client_context(fe_settings(pki, verify_server=False)))
        assert await client.echo(b"ok") == b"ok"
        await client.close()


@pytest.mark.asyncio
async def test_client_without_certificate_is_refused_when_required(pki: Pki) -> None:
    async with echo_server(server_context(pool_settings(pki))) as server:
        assert await echo_refused(server.port, client_context(fe_settings(pki)))
    assert server.peers == []


@pytest.mark.asyncio
async def test_client_certificate_from_unknown_ca_is_refused(pki: Pki) -> None:
    async with echo_server(server_context(pool_settings(pki))) as server:
        assert await echo_refused(server.port, client_context(fe_settings(pki, pki.stranger)))
    assert server.peers == []


async def reload_keeps_established_connections(pki: Pki) -> None:
    contexts = ServerContexts(pool_settings(pki))
    client_ctx = client_context(fe_settings(pki, pki.fe))
    async with echo_server(contexts.base_context) as server:
        before = await connect(server.port, client_ctx)
        assert before.server_certificate() == pki.pool.der()

        contexts.reload(
            pool_settings(
                pki,
                certificate=pki.pool_renewed.certificate,
                private_key=pki.pool_renewed.private_key,
            )
        )
        after = await connect(server.port, client_ctx)
        assert after.server_certificate() == pki.pool_renewed.der()
        assert await after.echo(b"new") == b"new"
        assert await before.echo(b"still up") == b"still up"
        assert before.server_certificate() == pki.pool.der()
        await before.close()
        await after.close()
    assert all(peer is not None and certificate_names(peer) == [FE] for peer in server.peers)


@pytest.mark.asyncio
async def test_reload_swaps_the_certificate_for_new_connections_only(pki: Pki) -> None:
    await reload_keeps_established_connections(pki)


def test_reload_swaps_the_certificate_under_uvloop(pki: Pki) -> None:
    uvloop.run(reload_keeps_established_connections(pki))


@pytest.mark.asyncio
async def test_bad_new_certificate_keeps_the_old_one(pki: Pki) -> None:
    contexts = ServerContexts(pool_settings(pki))
    old = contexts.current
    broken = pki.directory / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    with pytest.raises(TlsConfigError, match=re.escape("tls.certificate: %s" % broken)):
        contexts.reload(pool_settings(pki, certificate=broken))
    with pytest.raises(TlsConfigError, match="does not match"):
        contexts.reload(pool_settings(pki, private_key=pki.fe.private_key))
    assert contexts.current is old
    assert contexts.settings.certificate == pki.pool.certificate
    async with echo_server(contexts.base_context) as server:
        client = await connect(server.port, client_context(fe_settings(pki, pki.fe)))
        assert client.server_certificate() == pki.pool.der()
        assert await client.echo(b"ok") == b"ok"
        await client.close()


@pytest.mark.parametrize("change", [{"require_client_certificate": False}, {"min_version": "1.3"}])
def test_reload_refuses_settings_fixed_until_restart(pki: Pki, change: dict[str, object]) -> None:
    contexts = ServerContexts(pool_settings(pki))
    old = contexts.current
    [name] = change
    with pytest.raises(TlsConfigError, match="tls.%s: .*restart" % name):
        contexts.reload(pool_settings(pki, **change))
    assert contexts.current is old
