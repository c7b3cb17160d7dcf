"""`python -m trades_repro` is the `trades-repro` command."""

from trades_repro.entry import run

run()
