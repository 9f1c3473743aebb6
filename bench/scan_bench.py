"""CPU cost of the proxy's fast-path scans, and of a 180 through the element,
timed hot: the same message again and again, no sockets, no event loop.

The messages are those of ``bench/proxy_core_bench.py``'s calls (the unit
tests' simulated client and pool): the client's INVITE, ACK and BYE, and the
pool's 180.  ``receive_180`` passes that 180 through ``Element.receive``
again and again while the INVITE is pending (the client transaction in
Proceeding), so it is the scan plus the transaction machines.  Hot figures
are a floor: in the daemon each message runs among the event loop's other
work, and ``proxy_core_bench.py`` shows it costing about twice as much.

    .venv/bin/python bench/scan_bench.py [--n N] [--repeat R]

Prints one JSON line: µs per call of each, best of R runs of N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.sip.relay import scan_in_dialog, scan_invite, scan_response  # noqa: E402
from tests.unit.sipmsg import reply_to  # noqa: E402
from tests.unit.test_proxy_element import (  # noqa: E402
    CLIENT_UDP,
    POOL1,
    Pool,
    client_in_dialog,
    invite,
    wire,
)


def best(call: Callable[[], object], n: int, repeat: int) -> float:
    fastest = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        fastest = min(fastest, (time.perf_counter() - t0) / n)
    return round(fastest * 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=9)
    a = ap.parse_args()
    # a call answered 200: the messages as the element sees them
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    request = invite(CLIENT_UDP)
    uac.call(request)
    net.advance()
    final = uac.got(b"SIP/2.0 200 ")[0]
    ack = client_in_dialog("ACK", final, cseq=1)
    bye = client_in_dialog("BYE", final, cseq=2)
    # a call whose INVITE is still pending, for the 180 through the element
    late = Pool("pool1", POOL1, ((100.0, 200),))
    net2, uac2 = wire(late)
    uac2.call(invite(CLIENT_UDP, branch="z9hG4bK-late", call_id="late@bench"))
    net2.advance()
    ringing = reply_to(late.got(b"INVITE ")[0], 180, "Ringing", to_tag="p1")
    element, peer = net2.element, late.peer
    element.receive(ringing, peer, 1.0)  # now in Proceeding
    n, r = a.n, a.repeat
    out = {
        "us_scan_invite": best(lambda: scan_invite(request, 65535, 128), n, r),
        "us_scan_ack": best(lambda: scan_in_dialog(ack, 65535, 128), n, r),
        "us_scan_bye": best(lambda: scan_in_dialog(bye, 65535, 128), n, r),
        "us_scan_180": best(lambda: scan_response(ringing, 65535, 128), n, r),
        "us_receive_180": best(lambda: element.receive(ringing, peer, 1.0), n, r),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
