# GPU image: CUDA torch + vLLM from PyPI, distillery installed on top. No Docker engine runs in CI: the tests
# lint this file with hadolint. Build and run on a GPU host:
#   docker build -t distillery:gpu .
#   docker run --gpus all -v "$PWD/work:/work" -e MLFLOW_TRACKING_URI -e PREFECT_API_URL distillery:gpu run r1-distill
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HOME=/work/hf

RUN useradd --create-home --uid 1000 distillery \
    && mkdir -p /work \
    && chown distillery:distillery /work

WORKDIR /app
COPY pyproject.toml README.md pipelines.yaml ./
COPY distillery ./distillery
COPY flows ./flows
COPY tasks ./tasks
COPY serving ./serving
COPY evals ./evals

# Editable, so evals/ and pipelines.yaml stay beside the code; [gpu] brings vllm, which pins its CUDA torch.
RUN pip install --no-cache-dir "uv==0.13.9" \
    && uv pip install --system --no-cache -e ".[gpu]"

USER 1000:1000
WORKDIR /work
ENTRYPOINT ["distillery"]
CMD ["--help"]
