"""Typed configuration: YAML file -> validated, frozen pydantic models (STYLE.md §4).

`load_config(path, overrides)` is the one place that reads a config file. Unknown keys are
rejected with the file and the dotted key named (and a close match suggested); relative paths are
resolved against the folder of the config file, so a job behaves the same from any directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forecaster.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "FeedbackConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "GapConfig",
    "PreprocessConfig",
    "SplitConfig",
    "StationarityConfig",
    "SyntheticConfig",
    "WindowConfig",
    "load_config",
    "parse_config",
]


class _Section(BaseModel):
    # No inf or NaN in any float setting: `weight_decay: .inf` would otherwise train to a
    # divergence blamed on the learning rate.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


SEED_MAX = 2**63 - 1  # numpy's and torch's generators take seeds in [0, 2**63)


class SyntheticConfig(_Section):
    """The embedded synthetic plant generator (`forecaster.data.generate_plant`)."""

    n_series: int = Field(3, gt=0)
    length: int = Field(24 * 7 * 12, gt=0, description="points per series")
    freq: str = "h"
    start: str = "2024-01-01 00:00:00"
    n_anomalies: int = Field(3, ge=0, description="injected, labelled anomalies per series")
    n_level_shifts: int = Field(1, ge=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)


class GapConfig(_Section):
    """What to do with missing timestamps inside a series."""

    policy: Literal["refuse", "interpolate"] = "refuse"
    max_gap: int = Field(3, ge=1, description="longest run of missing steps to interpolate")


class SplitConfig(_Section):
    """Chronological train/validation/test split.

    `ett` is the standard ETT protocol (../shared/data/README.md); `holdout` keeps the last
    `test_size` and the `val_size` before them (steps if >= 1, fractions of the series if < 1).
    """

    kind: Literal["holdout", "ett"] = "holdout"
    val_size: float = Field(0.1, gt=0)
    test_size: float = Field(0.1, gt=0)
    ett_dataset: Literal["ETTh", "ETTm"] = "ETTh"


class DataConfig(_Section):
    """Where the data comes from and how it is validated."""

    source: Literal["synthetic", "file"] = "synthetic"
    path: Path | None = None
    layout: Literal["long", "wide"] = "long"
    time_col: str | None = Field(None, description="auto-detected among ds, date, timestamp, …")
    id_col: str = "unique_id"
    target_col: str = "y"
    columns: list[str] | None = Field(None, description="wide layout: the series columns to use")
    freq: str | None = Field(None, description="pandas offset alias; inferred when omitted")
    unsorted: Literal["sort", "refuse"] = "sort"
    gaps: GapConfig = GapConfig()
    split: SplitConfig = SplitConfig()
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _path_for_files(self) -> DataConfig:
        if self.source == "file" and self.path is None:
            raise ValueError("source 'file' needs data.path")
        return self


class WindowConfig(_Section):
    """Look-back and horizon of the forecaster, in steps of the series' frequency."""

    lookback: int = Field(336, gt=0)
    horizon: int = Field(96, gt=0)


class PreprocessConfig(_Section):
    """Per-series preprocessing fitted on the training window (pipelines/preprocess.py)."""

    trend: Literal["none", "linear", "robust"] = "linear"
    seasonality: Literal["none", "stl", "mstl"] = "stl"
    periods: list[int] | None = Field(None, description="seasonal periods; detected when omitted")
    scaling: Literal["standard", "robust"] = "standard"
    difference: int = Field(0, ge=0, le=2)

    @model_validator(mode="after")
    def _periods_valid(self) -> PreprocessConfig:
        if self.periods is not None and any(p < 2 for p in self.periods):
            raise ValueError(f"periods must all be >= 2, got {self.periods}")
        if self.seasonality == "stl" and self.periods is not None and len(self.periods) > 1:
            raise ValueError("seasonality 'stl' takes one period; use 'mstl' for several")
        return self


class StationarityConfig(_Section):
    """The ADF + KPSS gate deciding fixed-feedback training vs remedy vs BPTT (ALGORITHMS §5.5)."""

    # KPSS p-values exist only inside [0.01, 0.1] (table interpolation); outside it the verdict
    # would hinge on a clipped value.
    alpha: float = Field(0.05, ge=0.01, le=0.1)
    remedy: Literal["difference", "none"] = "difference"
    d_max: int = Field(1, ge=0, le=2)
    strict: bool = Field(False, description="refuse to train instead of falling back to BPTT")
    allow_inconclusive: bool = False
    min_pass_fraction: float = Field(1.0, gt=0, le=1)


class ModelConfig(_Section):
    """Which model to build; `params` are the model's own hyper-parameters, validated by the
    registry against the model's dataclass (forecaster/models/registry.py)."""

    name: Literal["mi_gru", "lmn", "scrn", "gru", "lstm"] = "mi_gru"
    hidden_size: int = Field(64, gt=0)
    linear_lags: int = Field(
        0, ge=0, description="K > 0: add a linear readout of the last K inputs (NLinear skip)"
    )
    params: dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Section):
    """The temporally rescaled loss (ALGORITHMS.md §4.2); eta = gamma = 0, t0 = 0 is plain MSE."""

    kind: Literal["squared", "absolute"] = "squared"
    eta: float = Field(1.0, ge=0, description="time-index rescaling exponent a_t")
    gamma: float = Field(0.0, ge=0, description="horizon rescaling exponent c_k")
    burn_in: int | None = Field(
        None, ge=0, description="steps without loss t0; default min(24, T // 4)"
    )


class FeedbackConfig(_Section):
    """The fixed state feedback d of fixed-feedback training (ALGORITHMS.md §5.3) and the
    model-side checks of its assumption (§5.5 checks 2-4)."""

    # jacobian_matrix: the whole mean Jacobian as a non-diagonal fixed feedback M [S, S].
    # per_step_diag: the exact diagonal of every visited step (§5.3 option 4, an ablation: not
    # a fixed feedback); the mean diagonal is still estimated for the gate and the history.
    kind: Literal["jacobian_mean", "constant", "ssm_grid", "jacobian_matrix", "per_step_diag"] = (
        "jacobian_mean"
    )
    value: float = Field(0.9, gt=-1, lt=1, description="d for kind 'constant'")
    rho_max: float = Field(0.999, gt=0, lt=1, description="clip of |d_u|")
    refresh_every: int = Field(1, ge=1, description="epochs between estimates of d")
    refresh_steps: int = Field(
        1,
        ge=0,
        description="steps between re-evaluations of d at the current weights, for models with "
        "a closed-form mean Jacobian (LMN; others: per-epoch estimate only); 0: never",
    )
    estimate_batches: int = Field(4, ge=1)
    corrections: int = Field(
        0, ge=0, description="Jacobian correction sweeps of the feedback's backward (0: none)"
    )
    # The model-side gate (ALGORITHMS.md §5.5 checks 2-4; forecaster/training/gate.py).
    gate: bool = Field(True, description="check the fixed-feedback assumption on the model")
    gate_batches: int = Field(4, ge=1, description="validation batches K of the model gate")
    min_cosine: float = Field(
        0.8, ge=-1, description="gradient agreement: least cosine (> 1 always fails)"
    )
    min_norm_ratio: float = Field(0.5, gt=0, description="least |g_feedback| / |g_bptt|")
    max_norm_ratio: float = Field(2.0, gt=0, description="largest |g_feedback| / |g_bptt|")
    max_jacobian_cv: float = Field(
        0.5, gt=0, description="Jacobian stationarity: largest median per-unit CV over time"
    )
    recheck_every: int = Field(
        2, ge=0, description="epochs between gradient-agreement rechecks (0: never)"
    )
    recheck_failures: int = Field(
        2, ge=1, description="consecutive failed rechecks that switch training to BPTT"
    )

    @model_validator(mode="after")
    def _check_norm_ratio(self) -> FeedbackConfig:
        if self.min_norm_ratio > self.max_norm_ratio:
            raise ValueError(
                f"min_norm_ratio {self.min_norm_ratio} exceeds max_norm_ratio {self.max_norm_ratio}"
            )
        return self


class TrainConfig(_Section):
    """How to train (forecaster/training); one name per knob in YAML, CLI and MLflow."""

    method: Literal["feedback", "bptt", "tbptt"] = "feedback"
    truncation: int = Field(32, ge=1, description="tbptt: steps per truncated segment")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    clip_norm: float = Field(1.0, gt=0)
    lr_decay: float = Field(0.5, gt=0, le=1, description="factor on a validation plateau")
    patience: int = Field(
        3,
        ge=1,
        description="validations without improvement before stopping (epochs when eval_every "
        "is 0; with eval_every, every validation counts, and lr_decay applies per plateau)",
    )
    eval_every: int = Field(0, ge=0, description="validate every N steps too (0: per epoch)")
    stride: int = Field(1, ge=1, description="steps between training windows")
    max_windows: int | None = Field(None, ge=1, description="subsample windows per epoch")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(False, description="mixed precision on CUDA")
    deterministic: bool = True
    loss: LossConfig = LossConfig()
    feedback: FeedbackConfig = FeedbackConfig()


class AnomalyConfig(_Section):
    """The causal anomaly detector (forecaster/anomaly.py `DetectorSettings`)."""

    false_alarm_rate: float = Field(0.001, gt=0, lt=1, description="flag when p <= this")
    horizons: list[int] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    lags: int = Field(2, ge=1, description="recent changes feeding each forecast")
    season: int | None = Field(None, ge=0, description="None: detect; 0: none")
    max_season: int = Field(1000, ge=2)
    calibration_window: int = Field(6000, ge=10, description="past residuals per horizon")
    tail_fraction: float = Field(0.06, gt=0, lt=0.5)
    hold: int = Field(
        100, ge=0, description="points after an alarm that need 2x surprise (no hold_fraction)"
    )
    ridge: float = Field(1e-3, gt=0)
    change_window: int = Field(
        32, ge=0, description="recent points the distribution-change test scores; 0: off"
    )
    hold_fraction: float | None = Field(
        0.3, ge=0, le=10, description="hold as a share of the fit segment's rows; None: `hold`"
    )
    hold_level: float = Field(
        0.9, gt=0, le=1, description="share of the flag level's surprise that starts a hold"
    )
    max_gap_fill: int = Field(
        32, ge=0, description="most missing rows put in one timestamp gap (on_time_grid)"
    )


Execution = Literal["local", "processes", "ray"]


class Config(_Section):
    """A whole job: one experiment and one registered model per config."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    window: WindowConfig = WindowConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    stationarity: StationarityConfig = StationarityConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    execution: Execution = Field(
        "local",
        description="where per-series stages run: local, processes or ray (RAY_ADDRESS joins a "
        "cluster; needs the [ray] extra)",
    )
    workers: int | None = Field(
        None, ge=1, description="processes, or CPUs of a local Ray; default: all CPUs"
    )

    @model_validator(mode="after")
    def _total_differencing(self) -> Config:
        # The gate's remedy differences on top of the configured order; the transform stops at 2.
        total = self.preprocess.difference + self.stationarity.d_max
        if total > 2:
            raise ValueError(
                f"preprocess.difference ({self.preprocess.difference}) + stationarity.d_max "
                f"({self.stationarity.d_max}) = {total} exceeds 2"
            )
        return self


_PATH_KEYS = (("data", "path"), ("output_dir",))


def _known_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_model(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc[-1]`."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        owner = _section_model(Config, loc)
        known = _known_keys(owner) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = f"; valid keys: {', '.join(known)}" if known else ""
        return f"{source}: unknown key '{key}'{hint}{valid}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" {value!r}"
    return f"{source}: {key}:{shown} {err['msg']}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_config(
    raw: dict[str, Any],
    *,
    base_dir: Path | None = None,
    source: str = "<config>",
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Validate a config tree (already parsed YAML) into a `Config`.

    Args:
        raw: the parsed YAML mapping.
        base_dir: folder that relative paths are resolved against (the config file's folder).
        source: name used in error messages (the file path).
        overrides: `section.key=value` strings using the YAML names; values are parsed as YAML.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    tree = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(text), f"override '{item}'")
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        messages = [_format_error(e, source) for e in exc.errors()]
        raise ConfigError(
            messages[0]
            if len(messages) == 1
            else f"{len(messages)} problems: " + "; ".join(messages),
            field=".".join(str(p) for p in exc.errors()[0]["loc"]),
        ) from None
    if base_dir is None:
        return config
    return _resolve_paths(config, base_dir)


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def absolute(path: Path) -> Path:
        return path if path.is_absolute() else (base_dir / path).resolve()

    data = config.data
    if data.path is not None:
        data = data.model_copy(update={"path": absolute(data.path)})
    return config.model_copy(update={"data": data, "output_dir": absolute(config.output_dir)})


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a YAML config; `ConfigError` names the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    return parse_config(
        raw or {}, base_dir=path.resolve().parent, source=str(path), overrides=overrides
    )
