"""CPU cost of the pure core per redirected call (INVITE in, 302 out, ACK in).

No sockets: this isolates what pcproxy's own code costs per call, the part
that bench/run-redirect measures together with uvloop and the kernel.

    .venv/bin/python bench/core_bench.py [--calls N] [--repeat R]

Prints one JSON line: microseconds of CPU per call (best of R runs) and the
split between the INVITE and the ACK; apart from them, ``us_timer_i``: the
expiry of each call's Timer I (T4 after its ACK, RFC 3261 §17.2.1), which the
daemon also pays per call, here all handled in one ``handle_timers``.
"""

from __future__ import annotations

import argparse
import json
import re
import time

from proxy.element import Element
from proxy.sip.peer import Peer
from proxy.store import Endpoint, Snapshot

INVITE = (
    "INVITE sip:ocschat@contoso.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{n}-1-0\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Chat Client {n}" <sip:user{n}@contoso.com>;tag={n}SIPpTag00{n};epid=5eb1{n}\r\n'
    "To: <sip:ocschat@contoso.com>\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:user{n}@contoso.com;opaque=user:epid:5eb1{n};gruu>\r\n"
    "Supported: ms-sender\r\n"
    "User-Agent: ocschat-bench-client/1.0\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{body}"
)
BODY = (
    "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=session\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=message 5060 sip null\r\na=accept-types:text/plain text/html\r\n"
)
ACK = (
    "ACK sip:ocschat@contoso.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{n}-1-0\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Chat Client {n}" <sip:user{n}@contoso.com>;tag={n}SIPpTag00{n};epid=5eb1{n}\r\n'
    "To: <sip:ocschat@contoso.com>;tag={totag}\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: 1 ACK\r\n"
    "Content-Length: 0\r\n\r\n"
)
TAG = re.compile(rb"\r\nTo: [^\r]*;tag=([^;\r]+)")


def run(calls: int) -> tuple[float, float, float]:
    ep = Endpoint(
        "sip:ocschat@contoso.com",
        "ocschat@contoso.com",
        "pcpool.contoso.com",
        None,
        None,
        None,
        "tcp",
        "",
        "",
    )
    element = Element(Snapshot({ep.key: ep}, 1))
    peer = Peer("udp", "127.0.0.1", 5061)
    invites = [INVITE.format(n=n, length=len(BODY), body=BODY).encode() for n in range(calls)]
    t0 = time.process_time()
    responses = [element.receive(inv, peer, 1.0)[0].data for inv in invites]
    t1 = time.process_time()
    acks = []
    for n, resp in enumerate(responses):
        m = TAG.search(resp)
        assert m is not None and resp.startswith(b"SIP/2.0 302"), resp
        acks.append(ACK.format(n=n, totag=m.group(1).decode()).encode())
    t2 = time.process_time()
    for ack in acks:
        element.receive(ack, peer, 1.1)
    t3 = time.process_time()
    assert element.in_flight() == 0
    element.handle_timers(100.0)
    t4 = time.process_time()
    assert not element.transactions
    return (t1 - t0) / calls * 1e6, (t3 - t2) / calls * 1e6, (t4 - t3) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    best = min((run(a.calls) for _ in range(a.repeat)), key=lambda r: r[0] + r[1])
    print(
        json.dumps(
            {
                "calls": a.calls,
                "us_per_call": round(best[0] + best[1], 2),
                "us_invite_302": round(best[0], 2),
                "us_ack": round(best[1], 2),
                "us_timer_i": round(best[2], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
