"""SIP URIs (RFC 3261 §19.1), endpoint identities and pool names."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.sip.errors import UriError
from proxy.sip.uri import (
    MAX_URI_LENGTH,
    AddressOfRecord,
    SipUri,
    check_uri,
    normalise_fqdn,
    parse_uri,
    scheme_of,
)


# parsing well-formed URIs ------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "user", "password", "host", "port"),
    [
        ("sip:ocschat@contoso.com", "ocschat", None, "contoso.com", None),
        ("sip:192.0.2.1:5060", None, None, "192.0.2.1", 5060),
        ("sip:pcpool.contoso.com.", None, None, "pcpool.contoso.com.", None),
        ("sips:alice:secret@atlanta.com:5061", "alice", "secret", "atlanta.com", 5061),
        ("sip:alice:@atlanta.com", "alice", "", "atlanta.com", None),
        ("sip:bob@[2001:db8::10]", "bob", None, "[2001:db8::10]", None),
        ("sip:bob@[2001:db8::10]:5070", "bob", None, "[2001:db8::10]", 5070),
        ("sip:[::ffff:192.0.2.1]", None, None, "[::ffff:192.0.2.1]", None),
        # RFC 4475 §3.1.1.3: escapes stay escaped in the user part
        ("sip:%61lice@atlanta.com", "%61lice", None, "atlanta.com", None),
        # RFC 4475 §3.1.1.10: the user part may hold ';' ...
        (
            "sip:user;par=u%40example.net@example.com",
            "user;par=u%40example.net",
            None,
            "example.com",
            None,
        ),
        # ... and '?' (RFC 3261 §25.1 user-unreserved), which is then no header
        ("sip:host?x=a@example.com", "host?x=a", None, "example.com", None),
        # RFC 4475 §3.1.1.2
        (
            "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_"
            "too.(doesn't-it)@example.com",
            "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*",
            "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)",
            "example.com",
            None,
        ),
        # RFC 5118 §4.10: the extra colon RFC 3261's ABNF admits is tolerated
        ("sip:user@[2001:db8:::192.0.2.1]", "user", None, "[2001:db8:::192.0.2.1]", None),
        ("sip:user@[2001:db8::192.0.2.1]", "user", None, "[2001:db8::192.0.2.1]", None),
        ("sip:u@h.example.com:65535", "u", None, "h.example.com", 65535),
    ],
)
def test_parses_userinfo_host_and_port(
    text: str, user: str | None, password: str | None, host: str, port: int | None
) -> None:
    uri = SipUri.parse(text)
    assert (uri.user, uri.password, uri.host, uri.port) == (user, password, host, port)


def test_parses_params_in_order_with_lower_case_names_and_headers() -> None:
    uri = SipUri.parse(
        "SIPS:Alice@Atlanta.com;Transport=TCP;lr;maddr=[2001:db8::1]?subject=hi&priority=urgent"
    )
    assert uri.scheme == "sips"
    assert uri.user == "Alice"
    assert uri.params == (("transport", "TCP"), ("lr", None), ("maddr", "[2001:db8::1]"))
    assert uri.param("transport") == "TCP"
    assert uri.param("lr") == ""
    assert uri.param("ttl") is None
    assert uri.headers == "subject=hi&priority=urgent"


def test_empty_headers_are_kept_apart_from_no_headers() -> None:
    assert SipUri.parse("sip:a@example.com?").headers == ""
    assert SipUri.parse("sip:a@example.com").headers is None


@pytest.mark.parametrize(
    "text",
    [
        "sip:ocschat@contoso.com",
        "sips:alice:secret@[2001:db8::10]:5061;transport=tls;lr?subject=hi&x=%20",
        "sip:user;par=u%40example.net@example.com;maddr=239.255.255.1;ttl=15",
        "sip:192.0.2.1:5060;transport=udp",
    ],
)
def test_str_gives_back_the_uri(text: str) -> None:
    assert str(SipUri.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:@example.com",
        "sip:user@",
        "sip:user@example.com:0",
        "sip:user@example.com:65536",
        "sip:user@example.com:123456",
        "sip:user@example.com:http",
        "sip:user@example.com:",
        "sip:user@[2001:db8::1",
        "sip:user@[2001:db8::g]",
        "sip:user@[2001:db8:::1]",
        "sip:user@[::1]5060",
        "sip:user@999.1.1.1",
        "sip:user@01.2.3.4",
        "sip:user@1.2.3",
        "sip:user@exa mple.com",
        "sip:us er@example.com",
        "sip:user@-example.com",
        "sip:user@example-.com",
        "sip:user@example.123",
        "sip:user@example..com",
        "sip:%zzuser@example.com",
        "sip:a@b@example.com",
        "sip:user:pa;ss@example.com",
        "sip:user@example.com;=x",
        "sip:user@example.com;a=",
        "sip:user@example.com;a;;b",
        "sip:user@example.com;a=b c",
        "sip:user@example.com?a=b c",
        "sip:user@example.com?a=<b>",
        "sip:user@example.com>",
        "sip:<user@example.com>",
        "ocschat@contoso.com",
        ":ocschat@contoso.com",
        "1sip:ocschat@contoso.com",
    ],
)
def test_malformed_uri_is_400(text: str) -> None:
    with pytest.raises(UriError) as info:
        SipUri.parse(text)
    assert info.value.status == 400
    with pytest.raises(UriError):
        check_uri(text)


@pytest.mark.parametrize(
    "text",
    ["tel:+1-201-555-0123", "http://example.com/chat", "im:alice@example.com", "TEL:911"],
)
def test_other_scheme_is_416(text: str) -> None:
    """RFC 3261 §8.2.2.1: 416 Unsupported URI Scheme."""
    with pytest.raises(UriError) as info:
        SipUri.parse(text)
    assert info.value.status == 416


def test_uri_longer_than_the_bound_is_414() -> None:
    text = "sip:%s@contoso.com" % ("a" * MAX_URI_LENGTH)
    with pytest.raises(UriError) as info:
        SipUri.parse(text)
    assert info.value.status == 414
    with pytest.raises(UriError) as info:
        check_uri(text)
    assert info.value.status == 414


def test_uri_at_the_bound_parses() -> None:
    text = "sip:%s@contoso.com" % ("a" * (MAX_URI_LENGTH - len("sip:@contoso.com")))
    assert len(text) == MAX_URI_LENGTH
    assert SipUri.parse(text).host == "contoso.com"


def test_parse_uri_returns_the_cached_equal_uri() -> None:
    first = parse_uri("sip:cached@contoso.com;transport=tcp")
    assert parse_uri("sip:cached@contoso.com;transport=tcp") is first
    assert first == SipUri.parse("sip:cached@contoso.com;transport=tcp")


def test_scheme_of_any_absolute_uri() -> None:
    assert scheme_of("TEL:+1") == "tel"
    assert scheme_of("sips:a@b") == "sips"
    assert scheme_of("no scheme") == ""
    assert scheme_of("1x:y") == ""


# identity keys -------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "sip:ocschat@contoso.com",
        "sip:OCSChat@Contoso.com",
        "sip:%6fcschat@contoso.com",
        "sip:%4FCSCHAT@CONTOSO.COM",
        "SIP:ocschat@contoso.com.",
        "sip:ocschat@contoso.com:5061",
        "sip:ocschat@contoso.com;transport=tls;lr",
        "sip:ocschat@contoso.com?subject=x",
        "sip:ocschat:secret@contoso.com",
        "sips:ocschat@contoso.com",
    ],
)
def test_aor_key_ignores_case_escapes_port_and_params(text: str) -> None:
    assert SipUri.parse(text).aor_key == "ocschat@contoso.com"


def test_aor_key_tells_different_users_apart() -> None:
    assert SipUri.parse("sip:ocschat2@contoso.com").aor_key == "ocschat2@contoso.com"
    assert SipUri.parse("sip:contoso.com").aor_key == "@contoso.com"


# check_uri agrees with SipUri.parse ---------------------------------------------
_URI_CHARS = "abcXYZ019-_.!~*'()&=+$,;?/:@[]%<> \"\t"
_PIECES = st.sampled_from(
    (
        "sip: sips: SIP: tel: sip user @ : ; ? & = %41 %4 %zz alice ocschat contoso.com"
        " example.com. a.1b 1.2.3.4 256.1.1.1 01.2.3.4 1.2.3 0.0.0.0 [2001:db8::1] [::1]"
        " [2001:db8:::192.0.2.1] [2001:db8:::1] [1.2.3.4] [ ] 5060 0 65535 65536 99999"
        " transport=tls lr maddr=[::1] a-b -a a- .. $ / ,"
    ).split()
    + ["", "x" * 64]
)


@st.composite
def uri_like(draw: st.DrawFn) -> str:
    """Strings near the SIP URI grammar: mostly pieces of URIs, some noise."""
    parts = draw(st.lists(st.one_of(_PIECES, st.text(_URI_CHARS, max_size=3)), max_size=10))
    return "".join(parts)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(uri_like(), st.text(max_size=40)))
@example("sip:a.1b")
@example("sip:u@999.1.1.1")
@example("sip:u@1.2.3")
@example("sip:u@01.2.3.4")
@example("sip:host?x=a@b.example.com")
@example("sip:u@h:0")
@example("sip:u@[2001:db8:::192.0.2.1]")
def test_check_uri_raises_exactly_when_parse_raises(text: str) -> None:
    try:
        SipUri.parse(text)
    except UriError as exc:
        with pytest.raises(UriError) as info:
            check_uri(text)
        assert info.value.status == exc.status
    else:
        check_uri(text)


# endpoint identities and pool names ------------------------------------------------
def test_address_of_record_keeps_the_user_as_typed_and_lower_cases_the_domain() -> None:
    aor = AddressOfRecord.parse("  sip:OCSChat@Contoso.COM.  ")
    assert aor.text == "sip:OCSChat@contoso.com"
    assert aor.key == "ocschat@contoso.com"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ocschat@contoso.com", "must start with 'sip:'"),
        ("sips:ocschat@contoso.com", "must start with 'sip:'"),
        ("tel:+12015550123", "must start with 'sip:'"),
        ("sip:contoso.com", "no user part"),
        ("sip:ocschat@contoso.com:5061", "without password, port or parameters"),
        ("sip:ocschat@contoso.com;transport=tls", "without password, port or parameters"),
        ("sip:ocschat:pw@contoso.com", "without password, port or parameters"),
        ("sip:ocschat@contoso.com?subject=x", "without password, port or parameters"),
        ("sip:ocschat@contoso.com?", "without password, port or parameters"),
        ("sip:ocschat@192.0.2.1", "is an address"),
        ("sip:ocschat@localhost", "not fully qualified"),
        ("sip:ocschat@[2001:db8::1]", "not fully qualified"),
        ("sip:oc schat@contoso.com", "malformed user part"),
        ("sip:ocschat@contoso..com", "malformed host"),
    ],
)
def test_address_of_record_refuses(text: str, problem: str) -> None:
    with pytest.raises(UriError) as info:
        AddressOfRecord.parse(text)
    assert problem in info.value.reason


def test_normalise_fqdn_lower_cases_and_drops_the_root_dot() -> None:
    assert normalise_fqdn(" PCPool.Contoso.COM. ") == "pcpool.contoso.com"
    assert normalise_fqdn("a-1.b2.example") == "a-1.b2.example"
    label = "a" * 63
    assert normalise_fqdn("%s.com" % label) == "%s.com" % label


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "1 to 253 characters"),
        (".", "1 to 253 characters"),
        ("a." * 126 + "com", "1 to 253 characters"),
        ("localhost", "not fully qualified"),
        ("-pool.contoso.com", "invalid label"),
        ("pool-.contoso.com", "invalid label"),
        ("pool..contoso.com", "invalid label"),
        ("pool_1.contoso.com", "invalid label"),
        ("%s.com" % ("a" * 64), "invalid label"),
        ("192.0.2.1", "is an address"),
        ("pool.contoso.123", "is an address"),
    ],
)
def test_normalise_fqdn_refuses(text: str, problem: str) -> None:
    with pytest.raises(UriError) as info:
        normalise_fqdn(text, what="pool")
    assert problem in info.value.reason
