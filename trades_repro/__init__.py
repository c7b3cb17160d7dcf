"""trades-repro: TRADES robustness overestimation, made executable and verifiable."""

__version__ = "0.1.0"
