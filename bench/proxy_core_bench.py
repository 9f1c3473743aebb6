"""CPU cost of the pure core per proxied call, split by message.

No sockets, no event loop, no DNS server: the element of proxy mode between
a simulated client and pool (the in-memory network of
``tests/unit/test_proxy_element.py``), one call after the other: INVITE,
the pool's 180 and 200, the client's ACK and BYE (routed by their Route
sets), the pool's 200 for the BYE, every timer to the end.  Only the
element's own calls are timed (``receive``, ``targets_ready``,
``handle_timers``), so this is what pcproxy's code costs per call; the
difference with ``bench/run-proxy``'s CPU per call is uvloop, the socket
calls, the shell and the kernel.

    .venv/bin/python bench/proxy_core_bench.py [--calls N] [--repeat R]

Prints one JSON line: µs of CPU per call (best of R runs) and its split by
message (``INVITE``, ``targets_ready`` for the forwarding once the DNS plan
is there, ``180``, ``200`` for both 200s, ``ACK``, ``BYE``, ``timers``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.server import GC_THRESHOLD  # noqa: E402
from tests.unit.test_proxy_element import (  # noqa: E402
    CLIENT_UDP,
    POOL1,
    Pool,
    client_in_dialog,
    invite,
    wire,
)


def _kind(data: bytes) -> str:
    if data.startswith(b"SIP/2.0 "):
        return data[8:11].decode()
    return data[: data.find(b" ")].decode()


def run(calls: int) -> dict[str, float]:
    pool = Pool("pool1", POOL1, (180, 200))
    net, uac = wire(pool)
    element = net.element
    spent: dict[str, float] = defaultdict(float)
    receive, targets_ready, handle_timers = (
        element.receive,
        element.targets_ready,
        element.handle_timers,
    )

    def timed(kind: str, call: Any, *args: Any) -> Any:
        t0 = time.process_time()
        try:
            return call(*args)
        finally:
            spent[kind] += time.process_time() - t0

    element.receive = lambda data, peer, now: timed(_kind(data), receive, data, peer, now)  # type: ignore[method-assign]
    element.targets_ready = lambda *a: timed("targets_ready", targets_ready, *a)  # type: ignore[method-assign]
    element.handle_timers = lambda now: timed("timers", handle_timers, now)  # type: ignore[method-assign]
    for n in range(calls):
        uac.inbox.clear()
        uac.call(invite(CLIENT_UDP, branch="z9hG4bK-i%d" % n, call_id="call-%d@bench" % n))
        net.advance()
        final = next(m for m in uac.inbox if m.startswith(b"SIP/2.0 200"))
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            req = client_in_dialog(method, final, cseq=cseq)
            uac.send(req.replace(b"branch=z9hG4bK-", b"branch=z9hG4bK-%d-" % n, 1))
            net.advance()
    net.advance(600.0)  # every timer to its end
    assert not element.contexts and not element.transactions and not element.clients
    return {k: v / calls * 1e6 for k, v in spent.items()}


def main() -> None:
    gc.set_threshold(*GC_THRESHOLD)  # as the daemon runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    best = min((run(a.calls) for _ in range(a.repeat)), key=lambda r: sum(r.values()))
    out: dict[str, object] = {"calls": a.calls, "us_per_call": round(sum(best.values()), 1)}
    out.update({"us_" + k: round(v, 1) for k, v in sorted(best.items())})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
