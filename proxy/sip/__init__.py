"""The pure SIP core: no sockets, no asyncio, no clock of its own."""
