"""Checkout shim, not installed: ``python cli.py`` / ``python -m cli`` / ``import cli`` are :mod:`registry.cli`."""
import sys

import registry.cli

if __name__ == "__main__":
    registry.cli.main()
sys.modules[__name__] = registry.cli  # `import cli` is the package itself, so patching it patches the CLI
