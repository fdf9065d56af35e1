# ckpt-watchd as a sidecar: watches /runs and strips the checkpoints of finished training runs.
#
#   docker build --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" -t ckpt-watchd .
#   docker run -d --name ckpt-watchd -v "$PWD/runs:/runs" ckpt-watchd
#
# Run it as the trainer's UID/GID (the build args, or `docker run --user UID:GID`): it replaces
# checkpoints in place, so it needs write access to the weights folders, and the stripped files
# keep their owner only when it is the owner. See docs/deploy.md.
FROM python:3.11-slim

ARG UID=1000
ARG GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch from PyTorch's CPU index: the image must not carry the CUDA libraries (gigabytes)
# that the PyPI wheel pulls in; stripping never needs a GPU. Installed first, so the package's
# own `torch` requirement is already met and pip does not fetch another build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# The local package, not a PyPI name: its dependencies' ranges live in pyproject.toml
# (prometheus_client among them: --metrics-addr needs no extra).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && rm -rf /src

# A non-root user whose UID/GID match the trainer's, and a /runs it owns for an empty volume.
RUN groupadd --gid "${GID}" ckpt \
    && useradd --uid "${UID}" --gid "${GID}" --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ckpt \
    && mkdir /runs \
    && chown "${UID}:${GID}" /runs

# Logs go to stderr (`docker logs`); JSON for log shippers. /healthz is on loopback for the
# HEALTHCHECK below; set CKPT_WATCHD_METRICS_ADDR=0.0.0.0:9308 to let Prometheus scrape it.
# Docker waits 10 s after SIGTERM: in-flight strips get 8 of them (raise both together, with
# `docker stop -t` / stop_grace_period, for big checkpoints).
ENV CKPT_WATCHD_LOG_FORMAT=json \
    CKPT_WATCHD_METRICS_ADDR=127.0.0.1:9308 \
    CKPT_WATCHD_DRAIN_TIMEOUT=8

WORKDIR /runs
VOLUME /runs
USER ${UID}:${GID}
EXPOSE 9308

# Fails when the daemon is wedged: /healthz answers 503 unless the observer and the worker pool
# are alive and the last reconcile scan is recent. A long first scan is covered by start-period.
HEALTHCHECK --interval=60s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-m", "ckpt_watchd.ops.metrics", "probe"]

# Exec form: the daemon is PID 1 and gets docker's SIGTERM itself, then drains and exits 0.
ENTRYPOINT ["ckpt-watchd"]
CMD ["--root", "/runs"]
