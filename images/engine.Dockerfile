# syntax=docker/dockerfile:1
# The muxtune engine: one frozen backbone, many task adapters; what BackboneGroup pods run.
# torch comes from PyPI (its Linux x86_64 wheels bundle CUDA; the NVIDIA driver comes from the node).
# Build from the repository root:
#   docker build -f images/engine.Dockerfile -t ghcr.io/muxtune/engine:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md* ./
COPY muxtune/ muxtune/
COPY engine/ engine/
COPY operator/ operator/
COPY devcluster/ devcluster/
RUN python -m venv /opt/muxtune \
 && /opt/muxtune/bin/pip install --upgrade "pip>=24" \
 && /opt/muxtune/bin/pip install -c constraints.txt ".[engine]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="muxtune-engine" \
      org.opencontainers.image.description="Multi-task PEFT training engine over one shared LLM backbone" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/muxtune /opt/muxtune
RUN groupadd --gid 65532 muxtune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin muxtune
# Caches (Hugging Face, torch, triton) go to /tmp so the root filesystem can stay read-only.
ENV PATH=/opt/muxtune/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 9400 8000
ENTRYPOINT ["muxtune"]
CMD ["run", "--help"]
