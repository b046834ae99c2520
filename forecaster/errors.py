"""The one exception hierarchy of the project (STYLE.md §8).

Every error carries the HTTP status the service maps it to and, where one is known, the name of the
offending field, so the CLI can print one line and the service can answer
`{"error", "field", "detail"}`. Messages never carry URL credentials (a tracking URI's password
or token): they are masked as the error is made (`forecaster.redaction.redact`).
"""

from __future__ import annotations

from forecaster.redaction import redact


class ForecasterError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    http_status: int = 400

    def __init__(
        self, message: str, *, field: str | None = None, detail: str | None = None
    ) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = None if detail is None else redact(detail)

    def to_dict(self) -> dict[str, str | None]:
        """The JSON body the service returns for this error."""
        return {"error": self.message, "field": self.field, "detail": self.detail}


class ConfigError(ForecasterError):
    """A config file or override is invalid (unknown key, bad value, missing file)."""


class DataError(ForecasterError):
    """Input data violates the data contract; the message names series, row and value."""

    http_status = 422

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        detail: str | None = None,
        problems: list[str] | None = None,
    ) -> None:
        super().__init__(message, field=field, detail=detail)
        self.problems: list[str] = [redact(p) for p in problems] if problems else [self.message]


class ModelError(ForecasterError):
    """A model cannot be built, trained or run as asked (unknown name, bad hyper-parameter)."""


class ExportError(ForecasterError):
    """ONNX export failed or the exported graph does not match PyTorch."""

    http_status = 500


class TrackingError(ForecasterError):
    """MLflow tracking or the model registry failed."""

    http_status = 500


class ServingError(ForecasterError):
    """A request cannot be served (bad request content)."""


class ModelUnavailable(ServingError):
    """No loadable model can answer."""

    http_status = 503
