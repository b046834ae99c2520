"""Model registry: name -> (model class, hyper-parameter dataclass); `build` validates and builds.

Registering a model is one line in `_REGISTRY`. Entries are imported lazily, so a broken or
missing model file only affects its own name. Hyper-parameters are validated into the model's
frozen dataclass with pydantic's `TypeAdapter` (STYLE.md §3).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError

from forecaster.errors import ModelError
from forecaster.models.base import RecurrentForecaster


class _Entry(NamedTuple):
    module: str
    model_class: str
    config_class: str


_REGISTRY: dict[str, _Entry] = {
    "gru": _Entry("forecaster.models.rnn", "GRUForecaster", "GRUConfig"),
    "lmn": _Entry("forecaster.models.lmn", "LMN", "LMNConfig"),
    "lstm": _Entry("forecaster.models.rnn", "LSTMForecaster", "LSTMConfig"),
    "mi_gru": _Entry("forecaster.models.mi_gru", "MiGRU", "MiGRUConfig"),
    "scrn": _Entry("forecaster.models.scrn", "SCRN", "SCRNConfig"),
}


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _did_you_mean(value: str, options: list[str]) -> str:
    close = difflib.get_close_matches(value, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        names = model_names()
        raise ModelError(
            f"unknown model {name!r}; valid: {', '.join(names)}{_did_you_mean(name, names)}",
            field="model",
        )
    return _REGISTRY[name]


def resolve(name: str) -> tuple[type[RecurrentForecaster], type[Any]]:
    """The model class and its hyper-parameter dataclass for a registered name.

    Raises:
        ModelError: unknown name, or the model's module cannot be imported.
    """
    entry = _entry(name)
    try:
        module = importlib.import_module(entry.module)
        return getattr(module, entry.model_class), getattr(module, entry.config_class)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"model {name!r} is registered but cannot be loaded: {exc}") from exc


def config_class(name: str) -> type[Any]:
    """The frozen hyper-parameter dataclass of a registered model."""
    return resolve(name)[1]


def validate_hparams(name: str, hparams: dict[str, Any]) -> Any:
    """Validate a hyper-parameter dict into the model's dataclass.

    Raises:
        ModelError: unknown model, unknown field or invalid value; the message lists valid fields.
    """
    _, config_cls = resolve(name)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    valid = ", ".join(fields)
    unknown = [key for key in hparams if key not in fields]
    if unknown:
        key = unknown[0]
        raise ModelError(
            f"model {name!r}: unknown hyper-parameter {key!r}{_did_you_mean(key, fields)}; "
            f"valid: {valid}",
            field=key,
        )
    try:
        return TypeAdapter(config_cls).validate_python(dict(hparams))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['input']!r} ({err['msg']})"
            for err in exc.errors()
        )
        first = exc.errors()[0]["loc"]
        raise ModelError(
            f"model {name!r}: invalid hyper-parameter {problems}; valid fields: {valid}",
            field=str(first[0]) if first else None,
        ) from exc


def build(
    name: str,
    input_size: int,
    hidden_size: int,
    horizon: int,
    *,
    linear_lags: int = 0,
    **hparams: Any,
) -> RecurrentForecaster:
    """Build a registered model from typed hyper-parameters.

    Args:
        name: registry name (`gru`, `lmn`, `lstm`, `mi_gru`, `scrn`).
        input_size: features per step `d`.
        hidden_size: hidden width `h`.
        horizon: forecast length `H`.
        linear_lags: `K > 0` adds a linear readout of the last `K` inputs
            (`forecaster.models.lagged.LinearLags`); 0: the model alone.
        **hparams: the model's remaining hyper-parameters (fields of its config dataclass).

    Raises:
        ModelError: unknown name, unknown or invalid hyper-parameter, non-positive sizes, a
            negative `linear_lags`.
    """
    from forecaster.models.lagged import with_linear_lags

    if isinstance(linear_lags, bool) or not isinstance(linear_lags, int) or linear_lags < 0:
        raise ModelError(
            f"linear_lags: {linear_lags!r} is not a non-negative integer", field="linear_lags"
        )
    model_cls, _ = resolve(name)
    config = validate_hparams(name, {"hidden_size": hidden_size, **hparams})
    return with_linear_lags(model_cls(config, input_size, horizon), linear_lags)
