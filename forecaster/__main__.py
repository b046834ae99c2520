"""`python -m forecaster ...` (and `torchrun ... -m forecaster train ...`): the CLI."""

from forecaster.cli import app

app(prog_name="forecaster")
