# syntax=docker/dockerfile:1
# One image, two entrypoints (the Deployments set `command`):
#   python -m services.api      HTTP publish API, port 8080
#   python -m services.socket   websocket gateway + demo page (web/), port 8081
#
# Base pinned by version tag. A digest cannot be resolved offline where this was written; pin it when
# you can: `docker buildx imagetools inspect python:3.11.17-slim-bookworm` (or crane digest), then
# build with --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# README.md* : copied when present (pyproject may name it as the readme), no error when absent.
COPY pyproject.toml README.md* ./
COPY services ./services
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed here. pip
# compiles the .pyc files at install time: the runtime root filesystem is read-only.
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pubsock" \
      org.opencontainers.image.description="pubsock api and socket services (one image, two entrypoints)"
RUN groupadd --system --gid 10001 pubsock \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pubsock
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The demo page and the browser client, served by the socket pods (same host as the websocket, so
# the page load sets the load balancer's affinity cookie). Read-only, owned by root. WEB_DIR tells
# the socket service where they are (its default, next to the source tree, is not in site-packages).
COPY web ./web
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WEB_DIR=/app/web \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080 8081
CMD ["python", "-m", "services.api"]
