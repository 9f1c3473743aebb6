"""pcproxy: keeps legacy Group Chat clients working against a Persistent Chat pool.

The package is split as the protocol is: ``proxy.sip`` is the pure SIP core
(bytes, events and ``now`` in; bytes, events and deadlines out), ``routing``
is the one decision of where a request goes, ``store`` holds the endpoint
table, and ``transport`` is the only place that touches sockets.
"""

__version__ = "0.1.0"
