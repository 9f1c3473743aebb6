"""Self-check of the RFC 4475 / RFC 5118 torture corpus (data only, no element).

Keeps ``expected.toml`` and the ``.sip`` files in step: every table has its file and
vice versa, checksums match, start lines match ``kind``, lines end in CRLF, and
Content-Length agrees with the body except where ``framing`` names a deliberate defect.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
RFCS = ("rfc4475", "rfc5118")
OUTCOMES = {"process", "reject", "either", "drop"}
FRAMINGS = {
    "ok",
    "cl-corrected",
    "no-blank-line",
    "trailing-octets",
    "cl-too-large",
    "cl-negative",
    "cl-conflicting",
    "no-content-length",
}
#: Bodies that are binary on purpose and may hold bare CR or LF octets.
BINARY_BODY = {"rfc4475/mpart01"}

REQUEST_LINE = re.compile(rb"^(?!SIP/)[!-~]+ +\S.* +SIP/\d+\.\d+ *$")
STATUS_LINE = re.compile(rb"^SIP/\d+\.\d+ \d+ ")
CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE)


def _load() -> dict[str, dict[str, dict[str, Any]]]:
    with open(HERE / "expected.toml", "rb") as f:
        return tomllib.load(f)


EXPECTED = _load()
CASES = [(rfc, name) for rfc in RFCS for name in EXPECTED.get(rfc, {})]


def _split(data: bytes) -> tuple[bytes, bytes | None]:
    """Header section and body; the body is None when no empty line ends the headers."""
    head, sep, body = data.partition(b"\r\n\r\n")
    return (head, body) if sep else (data, None)


def _unfolded_headers(head: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b" " + line.strip()
        elif line:
            lines.append(line)
    return lines


def _content_lengths(head: bytes) -> list[bytes]:
    return [m.group(1) for h in _unfolded_headers(head) if (m := CONTENT_LENGTH.match(h))]


def test_every_table_has_a_file_and_every_file_a_table() -> None:
    assert set(EXPECTED) == set(RFCS)
    for rfc in RFCS:
        on_disk = {p.stem for p in (HERE / rfc).glob("*.sip")}
        assert on_disk == set(EXPECTED[rfc]), rfc
        assert not [p for p in (HERE / rfc).iterdir() if p.suffix != ".sip"], rfc
    assert len(EXPECTED["rfc4475"]) == 49
    assert len(EXPECTED["rfc5118"]) == 12


@pytest.mark.parametrize(("rfc", "name"), CASES)
def test_entry(rfc: str, name: str) -> None:
    entry = EXPECTED[rfc][name]
    data = (HERE / rfc / f"{name}.sip").read_bytes()

    assert entry["size"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()

    first = data.split(b"\r\n", 1)[0]
    if entry["kind"] == "request":
        assert REQUEST_LINE.match(first), first
    else:
        assert entry["kind"] == "response"
        assert STATUS_LINE.match(first), first

    assert entry["transport"] == "udp"
    assert entry["outcome"] in OUTCOMES
    statuses = entry["statuses"]
    assert all(isinstance(s, int) and 300 <= s <= 699 for s in statuses)
    if entry["outcome"] in ("reject", "either"):
        assert statuses and entry["kind"] == "request"
    else:
        assert statuses == []
    assert entry["note"].startswith(f"RFC {rfc[3:]} §{entry['section']}")

    head, body = _split(data)
    # every line ends in CRLF: no bare LF, no bare CR (binary bodies excepted)
    checked = head if f"{rfc}/{name}" in BINARY_BODY else data
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", checked) is None
    assert data.endswith(b"\r\n")

    framing = entry["framing"]
    assert framing in FRAMINGS
    values = _content_lengths(head)
    if framing == "no-blank-line":
        assert body is None
        body = b""
    else:
        assert body is not None
    if framing == "no-content-length":
        assert values == []
        return
    if framing == "cl-conflicting":
        assert len(set(values)) > 1
        return
    assert len(values) == 1, values
    declared = int(values[0])
    if framing in ("ok", "no-blank-line", "cl-corrected"):
        assert declared == len(body)
    elif framing == "trailing-octets":
        assert declared < len(body)
    elif framing == "cl-too-large":
        assert declared > len(body)
    elif framing == "cl-negative":
        assert declared < 0
    if framing == "cl-corrected":
        assert entry["rfc_content_length"] != declared
    else:
        assert "rfc_content_length" not in entry
