# syntax=docker/dockerfile:1
# nld-gateway: the OpenAI-compatible gateway. Slim Python, no torch, no Ray, non-root.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t REGISTRY/nld-gateway:0.1.0 .
# and set the chart's gateway.image.repository / tag. The chart runs it with a read-only root
# filesystem and /tmp as an emptyDir.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/nld
COPY deploy/docker/gateway-requirements.txt /tmp/gateway-requirements.txt
RUN /opt/nld/bin/pip install -r /tmp/gateway-requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY replicas ./replicas
# --no-deps: the project's own dependencies include torch and Ray, which the gateway never imports.
RUN /opt/nld/bin/pip install --no-deps . && /opt/nld/bin/python -m compileall -q /opt/nld

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 nld && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin nld
COPY --from=build /opt/nld /opt/nld
ENV PATH=/opt/nld/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["nld-gateway"]
CMD ["serve", "--replica-url", "http://127.0.0.1:8000", "--host", "0.0.0.0", "--port", "8000"]
