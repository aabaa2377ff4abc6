# pfsync image: `docker build -t pfsync .` then `docker run --env-file pfsync.env pfsync sync`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pfsync ./pfsync
# The image is the product only: the local sandboxes and their fault-injection routes stay out
# (`pfsync sandbox` then says so). .dockerignore keeps them out of the build context too; the
# rm holds even when the image is built from a context that ignores .dockerignore.
RUN rm -rf pfsync/sandbox && pip install . && rm -rf /src

# Non-root; state (checkpoints, export files, queues) under /work/state (mount a volume, or use
# PFSYNC_STATE_BACKEND=medplum for stateless pods).
RUN useradd --uid 10001 --create-home --home-dir /work pfsync
USER 10001
WORKDIR /work
ENV PFSYNC_STATE_DIR=/work/state

ENTRYPOINT ["pfsync"]
CMD ["sync"]
