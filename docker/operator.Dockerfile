# syntax=docker/dockerfile:1
# The afc operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/afc-dev/afc-operator:0.1.0 .
# Entrypoint: the `afc-operator` console script (the one the tests run); non-root; works
# with a read-only root filesystem (no bytecode writes, /tmp is an emptyDir in the manifests).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN python -m venv /opt/afc \
 && /opt/afc/bin/pip install --constraint docker/constraints.txt ".[operator]" \
 && /opt/afc/bin/pip uninstall --yes pip \
 && /opt/afc/bin/afc-operator --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="afc-operator" \
      org.opencontainers.image.description="Reconciles AdaptiveConsumer resources into StatefulSets" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/afc/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/afc /opt/afc
RUN groupadd --system --gid 10001 afc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin afc
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["afc-operator"]
