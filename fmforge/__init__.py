"""fmforge: build a foundation model end to end, then grow specialists from it."""

__version__ = "0.1.0"
