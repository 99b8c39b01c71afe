# fmstream: one image for the one-shot topic creation, the trainer and the serving workers.
#   docker build -t fmstream .        docker run --rm fmstream --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch wheels: the default PyPI wheel carries CUDA libraries (gigabytes) the trainer
# does not use. Build with --build-arg TORCH_INDEX=https://pypi.org/simple for the default one.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fmstream ./fmstream
COPY model ./model
COPY stream ./stream
COPY serving ./serving
COPY train ./train
COPY config ./config
RUN pip install --extra-index-url "${TORCH_INDEX}" . \
 && useradd --create-home --uid 10001 fmstream \
 && mkdir -p /data \
 && chown fmstream /data

USER fmstream
# Checkpoints (and anything else a command keeps) live on the /data volume.
ENV FMSTREAM_RUN_DIR=/data \
    FMSTREAM_CHECKPOINT_DIR=/data/checkpoints
VOLUME ["/data"]

ENTRYPOINT ["fmstream"]
CMD ["--help"]
