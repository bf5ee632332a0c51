# edgeprune: one image for every Python service of docker-compose.yml (controller, slice
# nodes, camera). The broker uses the official eclipse-mosquitto:2 image instead.
#
#   docker compose build          # or: docker build -t edgeprune .
#   docker buildx build --platform linux/arm64 -t edgeprune .   # for Raspberry Pi 4/5 (64-bit)
#
# Building needs the network: the PyTorch CPU wheel index (or PyPI) for torch, PyPI for the
# other dependencies and for the dataset (`edgeprune data fetch` takes Animal-MNIST from its
# PyPI wheel). The image is built and run elsewhere: this repository's test machine has no
# Docker engine and cannot reach the PyTorch index; there, tests/integration/test_compose.py
# checks the compose file with `docker-compose config` and runs every service's command line
# locally instead.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the CPU-only index (no CUDA libraries: ~200 MB instead of several GB).
# Pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple to take it from PyPI instead.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The trained checkpoints (docker-compose.yml also mounts ./models over them, read-only, so a
# retrained model needs no rebuild). Before the install: the package ships the default model
# (pipeline/default_model/resnet-s.pt is a link to models/resnet-s.pt).
COPY models/ models/

# Then edgeprune and its other dependencies (torch is already satisfied).
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY bus/ bus/
COPY nodes/ nodes/
COPY controller/ controller/
COPY traces/ traces/
COPY broker/ broker/
COPY experiment/ experiment/
COPY bench/ bench/
COPY edgeprune/ edgeprune/
RUN pip install . && python -c "import torch, edgeprune; print('torch', torch.__version__)"

# The dataset the camera reads.
RUN edgeprune data fetch --data-dir /app/data

# Not root. runs/ is where calibration files and reports go (a volume in docker-compose.yml).
RUN useradd --create-home --uid 1000 edgeprune \
    && mkdir -p /app/runs \
    && chown -R edgeprune:edgeprune /app/runs
USER edgeprune

# Relative paths in the compose commands (models/..., runs/..., data/) resolve here, exactly
# as they resolve in a checkout for the local launcher.
ENV EDGEPRUNE_DATA_DIR=/app/data
CMD ["edgeprune", "--help"]
