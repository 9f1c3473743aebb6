#!/usr/bin/env python3
"""The floor under any Python proxy here: a uvloop UDP relay that parses nothing.

Every datagram from the pool goes to the last client address, every other
datagram to the pool: no Via, no Record-Route, no transaction, no DNS. SIPp's
proxy scenario still completes through it (the UAC sends ACK and BYE to the
address it was given, the pool answers the address a request came from), so
``bench/run-floor`` can put the CPU per proxied call of pcproxy and of
Kamailio beside what the event loop and the kernel alone cost for the same
messages, in the same run.

    python bench/floor_relay.py --port 5295 --pool 127.0.0.1:5270

Binds 127.0.0.1 only; stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import uvloop


class Relay(asyncio.DatagramProtocol):
    def __init__(self, pool: tuple[str, int]) -> None:
        self.pool = pool
        self.client: tuple[str, int] | None = None
        self.sendto = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.sendto = transport.sendto

    def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
        if addr == self.pool:
            if self.client is not None:
                self.sendto(data, self.client)
        else:
            self.client = addr
            self.sendto(data, self.pool)


async def serve(port: int, pool: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    await loop.create_datagram_endpoint(lambda: Relay(pool), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pool", required=True, help="HOST:PORT of the SIPp UAS (loopback)")
    a = ap.parse_args()
    host, _, port = a.pool.rpartition(":")
    if not host.startswith("127."):
        raise SystemExit("loopback pools only")
    uvloop.run(serve(a.port, (host, int(port))))


if __name__ == "__main__":
    main()
