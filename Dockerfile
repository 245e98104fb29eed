# syntax=docker/dockerfile:1
# onejump server image. Two flavours from one recipe (BuildKit builds only the base it needs):
#   docker build -t onejump:gpu .                           CUDA runtime + CUDA torch + bitsandbytes (default)
#   docker build --build-arg FLAVOR=cpu -t onejump:cpu .    python:3.11-slim + CPU torch, runs anywhere
# The model lives in the /data volume (`onejump assets` fills it, see docs/deploy.md) or is a hub id;
# the default jump is baked in and can be replaced from a mounted /jumps folder (ONEJUMP_JUMP).
ARG FLAVOR=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    PROJECT_EXTRAS=serve,bnb

FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
# torch's CUDA wheels must match the base's CUDA major version (cu128 wheels for CUDA 12.8)
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
    PROJECT_EXTRAS=serve,gpu

# build: a virtual environment with torch (its own layer: the big one) and the project, every version
# from requirements.lock (`make lock`); torch's build (CPU or CUDA) from the flavour's index
FROM base-${FLAVOR} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# torch alone from its index (no deps: that index need not hold the locked versions of torch's own deps)
RUN pip install -q -c requirements.lock --no-deps --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY shortcuts ./shortcuts
COPY service ./service
COPY loadtest ./loadtest
RUN pip install -q -c requirements.lock ".[${PROJECT_EXTRAS}]"

# runtime: the environment, the default jump, a non-root user
FROM base-${FLAVOR} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin onejump \
 && mkdir -p /data /jumps \
 && chown onejump:onejump /data
WORKDIR /app
COPY docs/results/smollm2-135m/jump.safetensors ./docs/results/smollm2-135m/jump.safetensors
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    ONEJUMP_CACHE=/data \
    ONEJUMP_MODEL=/data/models/smollm2-135m-instruct \
    ONEJUMP_JUMP=/app/docs/results/smollm2-135m/jump.safetensors \
    ONEJUMP_HOST=0.0.0.0 \
    ONEJUMP_PORT=8000
USER onejump
EXPOSE 8000
# /health answers 200 as soon as the server listens (/ready waits for the model): liveness, not readiness
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ONEJUMP_PORT', '8000'), timeout=4)" || exit 1
CMD ["python", "-m", "service"]
