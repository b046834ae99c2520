from __future__ import annotations

import os
from pathlib import Path

import pytest

from forecaster.config import load_config, parse_config
from forecaster.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_old_config_loads_and_resolves_paths_against_its_folder() -> None:
    config = load_config(FIXTURES / "v0_1.yaml")
    assert config.data.path == (FIXTURES.parent / "data" / "plant.csv").resolve()
    assert config.output_dir == (FIXTURES / "out").resolve()
    assert config.preprocess.periods == [24]


def test_paths_do_not_depend_on_working_directory(tmp_path: Path) -> None:
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        config = load_config(FIXTURES / "v0_1.yaml")
    finally:
        os.chdir(cwd)
    assert config.data.path == (FIXTURES.parent / "data" / "plant.csv").resolve()


def test_unknown_key_names_file_key_and_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown_key\.yaml: unknown key 'window\.lookbak'"
    ) as exc:
        load_config(FIXTURES / "unknown_key.yaml")
    assert "did you mean 'lookback'" in str(exc.value)


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: window\.horizon: -3 .*greater than 0"):
        parse_config({"name": "a", "window": {"horizon": -3}}, source="x.yaml")


def test_bad_literal_lists_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"preprocess\.trend: 'cubic'.*'none', 'linear' or 'robust'"
    ):
        parse_config({"name": "a", "preprocess": {"trend": "cubic"}})


def test_file_source_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        parse_config({"name": "a", "data": {"source": "file"}})


def test_overrides_use_yaml_names_and_validate() -> None:
    config = parse_config({"name": "a"}, overrides=["window.lookback=48", "preprocess.trend=none"])
    assert config.window.lookback == 48
    assert config.preprocess.trend == "none"
    with pytest.raises(ConfigError, match="unknown key 'window.lookbak'"):
        parse_config({"name": "a"}, overrides=["window.lookbak=48"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_config({"name": "a"}, overrides=["window.lookback"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


def test_config_is_frozen() -> None:
    config = parse_config({"name": "a"})
    with pytest.raises(ValueError, match="frozen"):
        config.window.lookback = 3  # type: ignore[misc]


def test_stl_takes_one_period() -> None:
    with pytest.raises(ConfigError, match="use 'mstl' for several"):
        parse_config({"name": "a", "preprocess": {"seasonality": "stl", "periods": [24, 168]}})


@pytest.mark.parametrize("name", ["demo.yaml", "etth1.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO_CONFIGS / name)
    assert config.name


def test_total_differencing_is_bounded() -> None:
    with pytest.raises(ConfigError, match=r"preprocess\.difference \(2\) \+ stationarity\.d_max"):
        parse_config({"name": "a", "preprocess": {"difference": 2}, "stationarity": {"d_max": 1}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"data": {"synthetic": {"seed": -1}}}, "data.synthetic.seed"),
    ],
)
def test_a_seed_the_generators_cannot_take_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: -?\d+ Input should be (greater|less) than"):
        parse_config({"name": "t", **raw})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_float_settings_refuse_inf_and_nan(value: float) -> None:
    with pytest.raises(
        ConfigError, match=r"train.weight_decay: .* Input should be a finite number"
    ):
        parse_config({"name": "t", "train": {"weight_decay": value}})
