# syntax=docker/dockerfile:1
# nld-gateway replicas: the Ray image (Ray 2.60, Python 3.11, CUDA) with torch and the project.
# The head and the GPU workers of the RayService run this image; the model is not in it (it
# comes from a PersistentVolumeClaim or the chart's download init container).
# Build from the repository root:
#   docker build -f deploy/docker/replica.Dockerfile -t REGISTRY/nld-replica:0.1.0 .
# and set the chart's replicas.image.repository / tag. RAY_IMAGE must carry the Ray version the
# chart declares (replicas.rayVersion) and pyproject pins (ray[serve]==2.60.0).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
ARG TORCH_SPEC="torch>=2.13,<2.16"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: PyPI's Linux wheels bundle the CUDA runtime; the image provides the driver hooks.
RUN pip install "${TORCH_SPEC}"
WORKDIR /home/ray/nld
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 replicas ./replicas
COPY --chown=1000:100 policies ./policies
COPY --chown=1000:100 gateway ./gateway
# huggingface_hub: the chart's model download init container runs snapshot_download.
RUN pip install . "huggingface_hub" \
    && python -c "import replicas.app, replicas.config, ray; assert ray.__version__ == '2.60.0', ray.__version__"
WORKDIR /home/ray
# The Ray image's non-root user (uid 1000, gid 100); the chart runs the pods as it.
USER 1000:100
