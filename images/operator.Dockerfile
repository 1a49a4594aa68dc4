# syntax=docker/dockerfile:1
# The muxtune operator: kopf + kubernetes client, no torch. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/muxtune/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The operator needs no engine (torch): engine/ is not copied, and the muxtune.engine packages are
# dropped from pyproject.toml before the wheel is built (every other mapped folder is copied).
COPY pyproject.toml constraints.txt README.md* ./
COPY muxtune/ muxtune/
COPY operator/ operator/
COPY devcluster/ devcluster/
RUN sed -i '/"muxtune\.engine/d' pyproject.toml \
 && python -m venv /opt/muxtune \
 && /opt/muxtune/bin/pip install --upgrade "pip>=24" \
 && /opt/muxtune/bin/pip install -c constraints.txt ".[operator]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="muxtune-operator" \
      org.opencontainers.image.description="Kubernetes operator packing FineTuneTasks into multiplexed backbone groups" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/muxtune /opt/muxtune
# Non-root (matches the chart's runAsUser/runAsGroup 65532); HOME on /tmp so the image runs with a
# read-only root filesystem and an emptyDir on /tmp.
RUN groupadd --gid 65532 muxtune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin muxtune
ENV PATH=/opt/muxtune/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["muxtune"]
CMD ["operator"]
