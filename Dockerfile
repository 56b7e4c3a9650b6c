# Two images, one per build target. No Docker engine runs in CI: the tests lint this file with hadolint.
#   docker build --target cpu -t distillery:cpu .   # the pinned CPU stack: requirements/cpu.lock, +cpu torch
#   docker build -t distillery:gpu .                # the default (last) target: CUDA torch + vLLM from PyPI
# Run a pipeline, or serve a model (inside a container the server must bind 0.0.0.0 to be reachable through -p):
#   docker run --gpus all -v "$PWD/work:/work" -e MLFLOW_TRACKING_URI -e PREFECT_API_URL distillery:gpu run r1-distill
#   docker run -p 127.0.0.1:8000:8000 -e DISTILLERY_API_KEY distillery:cpu serve-model demo:student --host 0.0.0.0

# The code, apart from the dependencies, so a code change does not invalidate the CPU image's dependency layer.
FROM scratch AS source
COPY pyproject.toml README.md pipelines.yaml /app/
COPY distillery /app/distillery
COPY flows /app/flows
COPY tasks /app/tasks
COPY serving /app/serving
COPY evals /app/evals

FROM python:3.11.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HOME=/work/hf \
    DISTILLERY_CACHE=/work/cache

RUN useradd --create-home --uid 1000 distillery \
    && mkdir -p /work \
    && chown distillery:distillery /work \
    && pip install --no-cache-dir "uv==0.13.9"

# serve-model's default port; publish it on the host's loopback unless an API key is set.
EXPOSE 8000
# The health rule (distillery/health.py): when the main process is vLLM's OpenAI server (what `distillery
# serve-model` execs into), the container is healthy once GET /health on that server's own --host/--port answers
# 200; any other command (a pipeline run, `distillery serve`, --help) has no endpoint and is healthy while it runs.
# Loading a 7B model takes minutes, hence the long start period. Both targets inherit this.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["python", "-m", "distillery.health"]
WORKDIR /app

FROM base AS cpu
# Every version pinned by the lock; the +cpu torch wheel lives on PyTorch's CPU index, not on PyPI.
COPY requirements/cpu.lock /app/requirements/cpu.lock
RUN uv pip install --system --no-cache -r requirements/cpu.lock \
        --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
COPY --from=source /app /app
# Editable, so evals/ and pipelines.yaml stay beside the code; --no-deps: the lock installed them all.
RUN uv pip install --system --no-cache --no-deps -e .
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["distillery"]
CMD ["--help"]

FROM base AS gpu
COPY --from=source /app /app
# [gpu] brings vllm==0.32.0, which pins its CUDA torch. speculators (draft.kind eagle3) caps datasets below our pin
# for a data CLI distillery does not use: installed without its dependencies (vllm and the rest bring them all).
RUN uv pip install --system --no-cache -e ".[gpu]" \
    && uv pip install --system --no-cache --no-deps "speculators==0.9.0" "hs-connectors==0.9.0"
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["distillery"]
CMD ["--help"]
