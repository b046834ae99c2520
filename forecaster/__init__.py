"""Forecasting library for industrial time series (import-light: no torch at import time)."""

__version__ = "0.1.0"
