# syntax=docker/dockerfile:1
# Two images from one file (docs/KUBERNETES.md):
#   docker build -t sd-torchserve .               the GPU server, TorchServe + our handler (the default target)
#   docker build --target front -t sd-front .     the web front: FastAPI only, no torch
#
# Base: Debian's slim Python, not a CUDA image nor pytorch/torchserve:0.12.0-gpu. PyPI's Linux torch wheel carries
# its own CUDA runtime, cuBLAS and cuDNN (the nvidia-* wheels it depends on), so a CUDA base image would only add
# a second, unused copy; the driver comes from the node through the NVIDIA container toolkit. The official TorchServe
# image runs Python 3.9 and an older torch, below what this project needs (Python 3.10+, torch 2.13.0), so our
# dependencies would be installed a second time on top of it; and its entrypoint backgrounds TorchServe
# (`torchserve --start; tail -f /dev/null`), so a crashed frontend would leave a live, useless container.
# Python 3.11 on Debian 12 is what the tests run on; both stages use the same base, so it is pulled once.

# ---------------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS front

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sd
COPY deploy/docker/front-requirements.txt /tmp/front-requirements.txt
RUN pip install --no-cache-dir -r /tmp/front-requirements.txt
COPY front /app/front

ENV PYTHONPATH=/app PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SD_FRONT_HOST=0.0.0.0 SD_FRONT_PORT=5000
WORKDIR /app
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ['SD_FRONT_PORT'], timeout=4)"]
# uvicorn handles SIGTERM itself (it finishes the requests in flight), so Python can be PID 1 here.
ENTRYPOINT ["python", "-m", "front.cli"]

# ---------------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS server

# Java 17 for TorchServe's frontend; tini as PID 1 (see ENTRYPOINT). The JRE's post-install links man pages into
# /usr/share/man/man1, which slim images do not have. Versions are not pinned: Debian's security updates replace
# them in the archive, and a pin would break the build at the next one.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# The project and its dependencies from pyproject.toml (torch, torchserve, ...): the big layer, rebuilt only when
# they or the packages it installs (ldm/, front/) change, not for every edit of the handler or scripts; pip's cache
# mount keeps the downloaded wheels between builds and out of the image.
COPY pyproject.toml README.md LICENSE /app/
COPY ldm /app/ldm
COPY front /app/front
RUN --mount=type=cache,target=/root/.cache/pip python -m venv /opt/venv && pip install /app

COPY handler /app/handler
COPY scripts /app/scripts
COPY configs /app/configs
COPY model-config.yaml /app/
COPY deploy/docker/entrypoint.sh /app/deploy/docker/entrypoint.sh

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/model-server --shell /usr/sbin/nologin \
        model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/config
# Settings for `docker run`; the Helm chart mounts its own over it (the chart's defaults render the same file).
COPY deploy/docker/config.properties /home/model-server/config/config.properties

# No weights by default. `--build-arg MODEL_MAR=sd.mar --build-arg MODEL_SHA256=...` unpacks
# deploy/docker/bake/sd.mar into the model store, checked like the chart's download (deploy/docker/bake/README.md).
ARG MODEL_MAR=""
ARG MODEL_SHA256=""
ARG MODEL_NAME=sd
RUN --mount=type=bind,source=deploy/docker/bake,target=/mnt/bake \
    if [ -n "$MODEL_MAR" ]; then \
        PYTHONPATH=/app python -m scripts.fetch_model --url "file:///mnt/bake/$MODEL_MAR" --sha256 "$MODEL_SHA256" \
            --store /home/model-server/model-store --name "$MODEL_NAME"; \
    fi

# PYTHONPATH: the readiness probe and init container run `python -m scripts...` (the entrypoint drops it for
# TorchServe, whose workers run the archive's code). Caches go to /tmp, the one
# writable place under a read-only root filesystem (Triton's and CUDA's kernel caches default to the home folder,
# which is not); nothing is ever downloaded from a model hub.
# NVIDIA_DRIVER_CAPABILITIES: `compute` for CUDA, `utility` for nvidia-smi, with which TorchServe counts the GPUs
# it spreads workers over. NVIDIA_VISIBLE_DEVICES is deliberately not set: the device plugin sets it to the GPUs
# the pod was given, and an image default of `all` would hand every GPU of the node to a pod that asked for none.
# /usr/local/nvidia: where GKE's device plugin mounts the driver (the NVIDIA container toolkit puts it on the usual
# paths instead; a CUDA base image would add these, python-slim does not).
# TORCHINDUCTOR_COMPILE_THREADS: torch.compile's worker processes, one per CPU of the node by default (32 on a large
# GPU node), each some hundreds of MB: within the container's memory limit.
ENV PYTHONPATH=/app PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/home/model-server XDG_CACHE_HOME=/tmp/cache HF_HUB_OFFLINE=1 \
    TRITON_HOME=/tmp/cache TRITON_CACHE_DIR=/tmp/cache/triton CUDA_CACHE_PATH=/tmp/cache/nv \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=$PATH:/usr/local/nvidia/bin LD_LIBRARY_PATH=/usr/local/nvidia/lib64 \
    TORCHINDUCTOR_COMPILE_THREADS=4
WORKDIR /home/model-server
USER 10001:10001
# Inference and metrics only: the management API (8081) listens on 127.0.0.1 inside the container.
EXPOSE 8080 8082
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s CMD ["python", "-m", "scripts.ready"]
# tini is PID 1: it reaps orphaned worker processes and passes SIGTERM to TorchServe's whole process group (-g):
# the launcher, the Java frontend and its Python workers. TorchServe runs in the foreground under it, so the
# container ends, and is restarted, when the frontend does.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/app/deploy/docker/entrypoint.sh"]
