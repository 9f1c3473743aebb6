"""The RFC 4475 / RFC 5118 torture corpus through the element, one datagram each.

``tests/corpus/expected.toml`` says what a redirect server must do with each
message (see ``tests/corpus/README.md``): ``process`` (a request gets a normal
answer, never 400; a response is absorbed), ``reject`` (a response whose
status is in ``statuses``), ``drop`` (nothing is sent) or ``either``.  Every
message goes to a fresh element whose endpoint table holds none of the
corpus's Request-URIs, as a UDP datagram from 127.0.0.1:5060.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.sip.message import Response, parse
from proxy.sip.peer import Send

from .sipmsg import UDP_PEER, make_element, sends, status_of

CORPUS = Path(__file__).parent.parent / "corpus"
with open(CORPUS / "expected.toml", "rb") as f:
    EXPECTED: dict[str, dict[str, dict[str, Any]]] = tomllib.load(f)
CASES = [
    pytest.param(rfc, name, entry, id="%s/%s" % (rfc, name))
    for rfc, entries in EXPECTED.items()
    for name, entry in entries.items()
]
#: Enough for any transaction the element may start to end (Timer H, J, I).
LATER = 3600.0


def run(data: bytes) -> tuple[list[Send], list[Send]]:
    """Feed one datagram to a fresh element; return what it sends at once and
    what its timers send afterwards, having run every timer to the end."""
    element = make_element()
    sent = sends(element.receive(data, UDP_PEER, 0.0))
    later: list[Send] = []
    for _ in range(100):
        deadline = element.next_deadline()
        if deadline is None:
            break
        assert deadline <= LATER
        later += sends(element.handle_timers(deadline))
    assert element.next_deadline() is None
    assert element.transactions == {}, "a transaction outlived its timers"
    return sent, later


def test_the_corpus_is_all_there() -> None:
    assert len(CASES) == 61


@pytest.mark.parametrize(("rfc", "name", "entry"), CASES)
def test_torture_message(rfc: str, name: str, entry: dict[str, Any]) -> None:
    data = (CORPUS / rfc / ("%s.sip" % name)).read_bytes()
    sent, later = run(data)
    outcome, statuses = entry["outcome"], entry["statuses"]

    if outcome == "drop" or (outcome == "process" and entry["kind"] == "response"):
        assert sent == [] and later == []
        return

    assert len(sent) == 1, "expected exactly one response, got %d" % len(sent)
    (send,) = sent
    status = status_of(send.data)
    assert send.peer.host == UDP_PEER.host
    assert all(s.data == send.data for s in later), "retransmissions must repeat the response"
    if outcome == "process":
        assert status != 400, "a well-formed request was refused"
        assert 200 <= status < 700
        assert isinstance(parse(send.data), Response), "the answer itself must parse"
    elif outcome == "reject":
        assert status in statuses
    else:
        assert outcome == "either"
        assert status != 400 or status in statuses
