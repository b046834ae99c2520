"""Registry: build by name, typed hyper-parameters, errors that list what is valid."""

from __future__ import annotations

import pytest

from forecaster.errors import ModelError
from forecaster.models.mi_gru import MiGRU, MiGRUConfig
from forecaster.models.registry import build, config_class, model_names, validate_hparams
from forecaster.models.rnn import GRUForecaster, LSTMForecaster


def test_build_returns_the_named_class_with_a_validated_config() -> None:
    model = build("mi_gru", 4, 8, 3, mi_init="mi")
    assert isinstance(model, MiGRU)
    assert model.config == MiGRUConfig(hidden_size=8, mi_init="mi")
    assert (model.input_size, model.hidden_size, model.horizon, model.state_size) == (4, 8, 3, 8)
    assert isinstance(build("gru", 1, 2, 3), GRUForecaster)
    assert isinstance(build("lstm", 1, 2, 3), LSTMForecaster)


def test_unknown_model_lists_valid_names_and_suggests_the_closest() -> None:
    with pytest.raises(ModelError) as info:
        build("mi_gruu", 4, 8, 3)
    assert str(info.value) == (
        "unknown model 'mi_gruu'; valid: gru, lmn, lstm, mi_gru, scrn (did you mean 'mi_gru'?)"
    )
    assert info.value.field == "model"


def test_unknown_model_without_a_close_match_has_no_suggestion() -> None:
    with pytest.raises(
        ModelError, match=r"^unknown model 'transformer'; valid: gru, lmn, lstm, mi_gru, scrn$"
    ):
        build("transformer", 4, 8, 3)


def test_unknown_hyper_parameter_lists_valid_fields() -> None:
    with pytest.raises(
        ModelError,
        match=r"model 'mi_gru': unknown hyper-parameter 'mi_int' \(did you mean 'mi_init'\?\); "
        r"valid: hidden_size, mi_init",
    ):
        build("mi_gru", 4, 8, 3, mi_int="mi")


def test_invalid_hyper_parameter_value_names_field_value_and_valid_fields() -> None:
    with pytest.raises(
        ModelError, match=r"mi_init: 'mix' \(Input should be 'gru' or 'mi'\)"
    ) as info:
        build("mi_gru", 4, 8, 3, mi_init="mix")
    assert "valid fields: hidden_size, mi_init" in str(info.value)
    assert info.value.field == "mi_init"


def test_non_positive_sizes_are_refused() -> None:
    with pytest.raises(ModelError, match=r"hidden_size: 0 is not a positive integer"):
        build("gru", 4, 0, 3)
    with pytest.raises(ModelError, match=r"horizon: -1 is not a positive integer"):
        build("mi_gru", 4, 8, -1)
    with pytest.raises(ModelError, match=r"input_size: 0 is not a positive integer"):
        build("lstm", 0, 8, 3)


def test_string_numbers_from_yaml_are_coerced_by_pydantic() -> None:
    assert validate_hparams("gru", {"hidden_size": "16"}) == config_class("gru")(hidden_size=16)


def test_model_names_are_sorted_and_stable() -> None:
    assert model_names() == ["gru", "lmn", "lstm", "mi_gru", "scrn"]
