"""The forecasting service (DESIGN.md §7): BentoML endpoints over ONNX Runtime, no torch.

`service` (endpoints), `runtime` (models, champion → fallback, batching), `schemas` (HTTP models),
`settings` (environment), `gateway` (auth, payload limit, readiness, counting), `registry` (the
MLflow download), `state` (carried recurrent state), `detect` (anomaly endpoint), `launch`
(`forecaster serve`). See serving/README.md for the endpoint reference.
"""
