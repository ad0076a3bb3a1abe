"""``python -m registry``: the ``registry`` command."""

from registry.cli import main

main()
