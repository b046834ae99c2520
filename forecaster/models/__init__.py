"""Recurrent forecasters sharing one contract (`base.RecurrentForecaster`) and a name registry."""

from __future__ import annotations

from forecaster.models.base import RecurrentForecaster
from forecaster.models.registry import build, model_names

__all__ = ["RecurrentForecaster", "build", "model_names"]
