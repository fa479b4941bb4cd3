# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target engine   -t kubellm-engine:0.1.0   .   # CUDA + PyTorch + `kubellm serve`
#   docker build --target operator -t kubellm-operator:0.1.0 .   # slim Python + the kopf operator
# Base images are pinned by tag; override with --build-arg to move them.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# wheel: builds the kubellm wheel once; both images install it, so neither
# carries the source tree or the build tools.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# engine: the inference server. PyTorch comes from PyPI (its Linux wheels carry
# their CUDA libraries); the CUDA base image provides the NVIDIA container
# runtime settings and driver-compatible user-space libraries.
FROM ${CUDA_IMAGE} AS engine
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kubellm \
    PATH=/opt/kubellm/bin:$PATH \
    HF_HOME=/tmp/hf-home
# The distribution's python3 is whatever Ubuntu 24.04 ships (3.12); pinning
# apt versions of a rolling security archive breaks rebuilds, so DL3008 is off.
# gcc, libc6-dev and python3-dev: Triton compiles its kernel launchers with the
# system C compiler against the Python headers the first time a kernel runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /models --shell /usr/sbin/nologin kubellm \
    && mkdir -p /models \
    && chown 10001:10001 /models
COPY --from=wheel /wheels /wheels
# torch is pinned beside the wheel so the kubellm[engine] range cannot pick another build.
# The wheel is the local one built above (DL3013 wants a version on every name).
# hadolint ignore=DL3013
RUN wheel="$(find /wheels -name 'kubellm-*.whl')" \
    && pip install "${wheel}[engine,server]" "torch==${TORCH_VERSION}" \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /models
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["kubellm"]
CMD ["serve", "/models", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------
# operator: reconciles ModelDeployments; no torch, no CUDA.
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN wheel="$(find /wheels -name 'kubellm-*.whl')" \
    && pip install "${wheel}[operator]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kubellm
USER 10001:10001
ENTRYPOINT ["kubellm-operator"]
