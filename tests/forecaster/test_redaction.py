"""URL credentials never reach a message: `forecaster.redaction.redact` and every error."""

from __future__ import annotations

import pytest

from forecaster.errors import DataError, TrackingError
from forecaster.redaction import redact, without_userinfo_secret


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://mlflow:hunter2@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("https://ci:tok%2Fen@mlflow:5000/", "https://ci:***@mlflow:5000/"),
        ("https://tok3n@mlflow", "https://***@mlflow"),
        ("mysql://u:p@ss@db/mlflow", "mysql://u:***@db/mlflow"),
        ("https://mlflow/?token=abc&x=1", "https://mlflow/?token=***&x=1"),
        ("sqlite:////srv/me@corp/mlruns.db", "sqlite:////srv/me@corp/mlruns.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_redact_hides_the_credentials_of_a_tracking_uri(uri: str, shown: str) -> None:
    assert redact(uri, uri) == shown
    assert (
        redact(f"request to {uri.rstrip('/')}/api failed")
        == f"request to {shown.rstrip('/')}/api failed"
    )


@pytest.mark.parametrize(
    ("uri", "kept"),
    [
        ("postgresql://mlflow:mlflow@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("mysql://u:p@ss@db/mlflow", "mysql://u:***@db/mlflow"),
        ("https://tok3n@mlflow", "https://***@mlflow"),
        ("https://mlflow/?token=abc&authSource=x", "https://mlflow/?token=abc&authSource=x"),
        ("sqlite:////srv/me@corp/mlruns.db", "sqlite:////srv/me@corp/mlruns.db"),
    ],
)
def test_without_userinfo_secret_masks_the_password_by_position_only(uri: str, kept: str) -> None:
    # A password that also spells the user or the database leaves them readable: the result
    # says which store and user, for comparing stores, and is not for showing (query secrets stay).
    assert without_userinfo_secret(uri) == kept


def test_redact_hides_the_uri_secrets_anywhere_in_a_message() -> None:
    uri = "https://ci:tok%2Fen@mlflow"
    assert redact("auth tok%2Fen or tok/en refused", uri) == "auth *** or *** refused"


def test_every_error_masks_url_credentials_in_its_message_and_detail() -> None:
    error = TrackingError(
        "registry call failed at postgresql://mlflow:hunter2@db/mlflow: refused",
        detail="GET https://ci:tok3n@mlflow/api?token=abc",
    )
    assert "hunter2" not in str(error)
    assert error.message == "registry call failed at postgresql://mlflow:***@db/mlflow: refused"
    assert error.to_dict()["detail"] == "GET https://ci:***@mlflow/api?token=***"
    assert DataError("row 3: value 'abc' is not numeric").message == (
        "row 3: value 'abc' is not numeric"
    )
