# syntax=docker/dockerfile:1
# The afc consumer runtime image. Build from the repository root:
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/afc-dev/afc-runtime:0.1.0 .
# Entrypoint: `afc-consumer run` (the console script the tests run); non-root (uid 10001, as the
# operator's pod securityContext expects); read-only root filesystem friendly.
# Handlers: build FROM this image and `pip install` your package into /opt/afc, or use an HTTP sink.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN python -m venv /opt/afc \
 && /opt/afc/bin/pip install --constraint docker/constraints.txt . \
 && /opt/afc/bin/afc-consumer --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="afc-runtime" \
      org.opencontainers.image.description="Adaptive Kafka consumer runtime (afc-consumer)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/afc/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/afc /opt/afc
RUN groupadd --system --gid 10001 afc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin afc
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["afc-consumer"]
CMD ["run"]
