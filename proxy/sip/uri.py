"""SIP and SIPS URIs: parsing, serialising and comparison keys.

RFC 3261 §19.1.1 gives the grammar (the ABNF is in §25.1), §19.1.4 the
comparison rules.  Endpoint identities follow Lync rather than §19.1.4 in one
point: Lync treats SIP addresses as case-insensitive, so the user part is
case-folded too, and ``sip:OCSChat@Contoso.com`` names the same endpoint as
``sip:ocschat@contoso.com``.  The comparison key of an identity is
``user@host`` with escapes decoded (§19.1.4: "%61lice" is "alice"), the user
case-folded and the host lower-cased; port and parameters are not part of the
identity.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

from proxy.sip.errors import UriError

MAX_URI_LENGTH = 2048

_MARK = r"\-_.!~*'()"
_UNRESERVED = "A-Za-z0-9" + _MARK
_USER_CHARS = re.compile(r"(?:[" + _UNRESERVED + r"&=+$,;?/]|%[0-9A-Fa-f]{2})+\Z")
_PASSWORD_CHARS = re.compile(r"(?:[" + _UNRESERVED + r"&=+$,]|%[0-9A-Fa-f]{2})*\Z")
_PARAM_CHARS = re.compile(r"(?:[" + _UNRESERVED + r"\[\]/:&+$]|%[0-9A-Fa-f]{2})+\Z")
_HEADER_CHARS = re.compile(r"(?:[" + _UNRESERVED + r"\[\]/?:+$=&]|%[0-9A-Fa-f]{2})*\Z")
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*"
    r"[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?\Z"
)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
_FQDN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class SipUri:
    """A parsed ``sip:`` or ``sips:`` URI (RFC 3261 §19.1.1).

    ``params`` keeps the parameters in order with their names lower-cased
    (parameter names compare case-insensitively, §19.1.4); ``user`` and the
    parameter values keep their escapes, so ``__str__`` gives back an
    equivalent URI.
    """

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...] = ()
    headers: str | None = None

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a SIP or SIPS URI.

        Raises ``UriError`` with status 416 for a well-formed URI of another
        scheme (RFC 3261 §8.2.2.1) and status 400 for anything malformed.
        """
        if len(text) > MAX_URI_LENGTH:
            raise UriError("URI longer than %d characters" % MAX_URI_LENGTH, 414)
        scheme, sep, rest = text.partition(":")
        if not sep or not _SCHEME.match(scheme):
            raise UriError("no URI scheme in %r" % text[:80])
        scheme = scheme.lower()
        if scheme not in ("sip", "sips"):
            raise UriError("unsupported URI scheme %r" % scheme, 416)

        user = password = None
        if "@" in rest:
            # '@' ends the userinfo and appears nowhere else (§25.1); the user
            # may hold ';' and '?', so they are looked for only after it
            userinfo, _, rest = rest.rpartition("@")
            user, colon, pw = userinfo.partition(":")
            if not _USER_CHARS.match(user):
                raise UriError("malformed user part %r" % user[:80])
            if colon:
                if not _PASSWORD_CHARS.match(pw):
                    raise UriError("malformed password")
                password = pw
        rest, qmark, headers = rest.partition("?")
        if qmark and not _HEADER_CHARS.match(headers):
            raise UriError("malformed URI headers")
        hostport, semi, paramtext = rest.partition(";")
        host, port = _split_hostport(hostport)
        params: list[tuple[str, str | None]] = []
        if semi:  # a trailing ';' is an empty uri-parameter, which §25.1 refuses
            for item in paramtext.split(";"):
                name, eq, value = item.partition("=")
                if not _PARAM_CHARS.match(name) or (eq and not _PARAM_CHARS.match(value)):
                    raise UriError("malformed URI parameter %r" % item[:80])
                params.append((name.lower(), value if eq else None))
        return cls(scheme, user, password, host, port, tuple(params), headers if qmark else None)

    def param(self, name: str) -> str | None:
        """Value of the first parameter called ``name`` ('' for a flag)."""
        for pname, value in self.params:
            if pname == name:
                return "" if value is None else value
        return None

    @property
    def aor_key(self) -> str:
        """The identity used to match the endpoint table: ``user@host``."""
        user = unquote(self.user).casefold() if self.user is not None else ""
        return "%s@%s" % (user, self.host.lower().rstrip("."))

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        if self.headers is not None:
            out += ["?", self.headers]
        return "".join(out)


_uri_cache: dict[str, SipUri] = {}
_key_cache: dict[str, str] = {}


def aor_key_of(text: str) -> str:
    """``parse_uri(text).aor_key``, computed once per distinct URI text."""
    key = _key_cache.get(text)
    if key is None:
        key = parse_uri(text).aor_key
        if len(_key_cache) >= 4096:
            _key_cache.clear()
        _key_cache[text] = key
    return key


def parse_uri(text: str) -> SipUri:
    """``SipUri.parse`` through a bounded cache: the URIs a server sees repeat
    (the well-known chat URI above all) and a ``SipUri`` is immutable."""
    uri = _uri_cache.get(text)
    if uri is None:
        uri = SipUri.parse(text)
        if len(_uri_cache) >= 4096:
            _uri_cache.clear()
        _uri_cache[text] = uri
    return uri


_U = r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]++|%[0-9A-Fa-f]{2})++"
_P = r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]++|%[0-9A-Fa-f]{2})*+"
#: hostname (RFC 3261 §25.1): labels of letters, digits and inner hyphens, the
#: top label starting with a letter; runs are possessive so nothing backtracks
_HOSTNAME_RE = (
    r"(?:[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+\.)*[A-Za-z][A-Za-z0-9]*+(?:-++[A-Za-z0-9]++)*+\.?"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: hostname (a top label starting with a letter) | IPv4address | IPv6reference
_H = r"(?:%s|%s|%s)" % (
    _HOSTNAME_RE,
    r"%s(?:\.%s){3}" % (_OCTET, _OCTET),
    r"\[[0-9A-Fa-f:.]+\]",
)
_PC = r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]++|%[0-9A-Fa-f]{2})++"
_HC = r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$=]++|%[0-9A-Fa-f]{2})*+"
#: A SIP URI without password, port or IPv6 reference, for embedding in other
#: patterns (``headers.NameAddr``): everything it matches ``SipUri.parse`` accepts.
SIP_URI_SIMPLE = r"[Ss][Ii][Pp][Ss]?:(?:%s@)?(?:%s|%s)(?:;%s(?:=%s)?)*+(?:\?%s(?:&%s)*+)?" % (
    _U.replace("?/]", "/]").replace(";", ""),
    _HOSTNAME_RE,
    r"%s(?:\.%s){3}" % (_OCTET, _OCTET),
    _PC,
    _PC,
    _HC,
    _HC,
)
_SIP_URI_SHAPE = re.compile(
    r"[Ss][Ii][Pp][Ss]?:(?:%s(?::%s)?@)?%s(?::[0-9]{1,5})?(?:;%s(?:=%s)?)*+(?:\?%s(?:&%s)*+)?\Z"
    % (_U, _P, _H, _PC, _PC, _HC, _HC)
)


def check_uri(text: str) -> None:
    """Validate a SIP or SIPS URI without building it (RFC 3261 §25.1).

    The grammar is one regular expression with possessive quantifiers that
    accepts exactly what ``SipUri.parse`` accepts, except what it cannot
    judge (an IPv6 reference, a port range), which goes through
    ``SipUri.parse``.
    """
    if text in _uri_cache:
        return
    if len(text) > MAX_URI_LENGTH or not _SIP_URI_SHAPE.match(text):
        SipUri.parse(text)  # raises with the precise reason
        raise UriError("malformed URI %r" % text[:80])
    if "[" in text or ":" in text[4:]:
        SipUri.parse(text)


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` and validate both (RFC 3261 §25.1 hostport)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UriError("unterminated IPv6 reference")
        host, rest = hostport[: end + 1], hostport[end + 1 :]
        if not _ipv6(host[1:-1]):
            raise UriError("malformed IPv6 reference %r" % host[:80])
        if rest and not rest.startswith(":"):
            raise UriError("garbage after IPv6 reference")
        portstr = rest[1:] if rest else None
    else:
        host, colon, portstr_ = hostport.partition(":")
        portstr = portstr_ if colon else None
        if _IPV4.match(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise UriError("malformed IPv4 address %r" % host) from None
        elif not _HOSTNAME.match(host):
            raise UriError("malformed host %r" % host[:80])
    port = None
    if portstr is not None:
        if not portstr.isdigit() or not portstr.isascii() or len(portstr) > 5:
            raise UriError("malformed port %r" % portstr[:10])
        port = int(portstr)
        if not 0 < port < 65536:
            raise UriError("port %d out of range" % port)
    return host, port


def _ipv6(text: str) -> bool:
    """An IPv6 address; like RFC 5118 §4.10, the ':::' before an embedded IPv4
    address that RFC 3261's ABNF admits is read as '::'."""
    try:
        ipaddress.IPv6Address(text)
        return True
    except ValueError:
        pass
    head, sep, tail = text.partition(":::")
    if not sep or "." not in tail or ":" in tail:
        return False
    try:
        ipaddress.IPv6Address(head + "::" + tail)
        return True
    except ValueError:
        return False


def scheme_of(text: str) -> str:
    """The lower-cased scheme of any absolute URI, or '' if there is none."""
    scheme, sep, _ = text.partition(":")
    return scheme.lower() if sep and _SCHEME.match(scheme) else ""


@dataclass(frozen=True, slots=True)
class AddressOfRecord:
    """An endpoint identity as an operator types it: ``sip:user@domain``.

    ``text`` is what is shown (the user as typed, the domain lower-cased);
    ``key`` is what is unique and matched (see the module docstring).
    """

    text: str
    key: str

    @classmethod
    def parse(cls, text: str) -> AddressOfRecord:
        """Validate a SIP address the way New-CsPersistentChatEndpoint does.

        It needs the ``sip:`` prefix, a user and a domain name; a port,
        parameters, headers or an IP address have no place in an identity.
        """
        text = text.strip()
        if not text.lower().startswith("sip:"):
            raise UriError("must start with 'sip:' (e.g. sip:ocschat@contoso.com)")
        try:
            uri = SipUri.parse(text)
        except UriError as exc:
            raise UriError(exc.reason) from None
        if uri.user is None or uri.user == "":
            raise UriError("has no user part (expected sip:user@domain)")
        extras = (uri.password, uri.port, uri.headers)
        if uri.params or any(x is not None for x in extras):
            raise UriError("must be sip:user@domain, without password, port or parameters")
        domain = normalise_fqdn(uri.host, what="domain")
        return cls("sip:%s@%s" % (uri.user, domain), uri.aor_key)


def normalise_fqdn(text: str, what: str = "name") -> str:
    """Check a fully qualified domain name per RFC 1123 §2.1 and lower-case it.

    At least two labels, each 1–63 letters, digits or inner hyphens, at most
    253 characters, and a top label that is not all digits (so that it cannot
    be read as an IPv4 address).  A trailing dot is accepted and removed.
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise UriError("%s must be 1 to 253 characters" % what)
    labels = name.split(".")
    if len(labels) < 2:
        raise UriError(
            "%s %r is not fully qualified (expected e.g. pcpool.contoso.com)" % (what, text)
        )
    for label in labels:
        if not _FQDN_LABEL.match(label):
            raise UriError(
                "%s %r has an invalid label %r (letters, digits and inner "
                "hyphens, 1-63 characters)" % (what, text, label)
            )
    if labels[-1].isdigit():
        raise UriError("%s %r is an address, not a domain name" % (what, text))
    return name
