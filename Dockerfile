# The serving image; the same image runs the retrain job with another command:
#   docker build -t forecaster .
#   docker run -v $PWD/.demo:/app/.demo forecaster forecaster retrain --config configs/demo.yaml
#   docker run -p 3000:3000 -v $PWD/.demo:/app/.demo forecaster                  # serve (default)
# configs/demo.yaml keeps its MLflow store and bundles in /app/.demo; mount another config and
# output folder for a real job (or set MLFLOW_TRACKING_URI to a tracking server).
# Serving alone needs no torch; it is installed (CPU build) so that `forecaster retrain` works.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# Optional extras, e.g. --build-arg EXTRAS="[ray]" for the image of a Ray/KubeRay cluster.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FORECASTER_DEVICE=cpu \
    BENTOML_HOME=/app/.bentoml

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system forecaster \
    && useradd --system --gid forecaster --home-dir /app --create-home forecaster

WORKDIR /app

# Dependencies first (cached while only the code changes): the CPU torch build, then the project.
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY forecaster ./forecaster
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install ".${EXTRAS}" \
    && pip uninstall -y onnxruntime-gpu \
    && pip install "onnxruntime>=1.31"
COPY configs ./configs

RUN mkdir -p /app/.demo /app/runs /app/.bentoml && chown -R forecaster:forecaster /app
USER forecaster

EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl --fail --silent http://127.0.0.1:3000/readyz || exit 1

CMD ["forecaster", "serve", "--config", "configs/demo.yaml", "--host", "0.0.0.0", "--port", "3000"]
