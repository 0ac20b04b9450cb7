"""`python -m minimoe demo` and friends: see minimoe/cli.py."""

from .cli import main

main()
