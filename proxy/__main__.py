"""``python -m proxy`` is the ``pcproxy`` command."""

from proxy.cli import main

main()
