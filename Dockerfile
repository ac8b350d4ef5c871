# syntax=docker/dockerfile:1.10
#
# Images of the TextNorm reward service (DESIGN.md 4): one multi-stage file, one image per role.
#
#   docker build --target gateway    -t textnorm-reward/gateway:0.2.0 .     # REST gateway, torch-free
#   docker build --target export     -t textnorm-reward/export:0.2.0 .      # torch (CPU): builds repositories
#   docker build --target export-gpu -t textnorm-reward/export:0.2.0-gpu . # + TensorRT: `build-engines` on GPU nodes
#   docker build --target triton     -t textnorm-reward/triton:0.2.0 .      # NGC Triton + the exported repositories
#   docker build --target all-in-one -t textnorm-reward/service:0.2.0 .    # `make serve` in one container (default)
#
# Helper stages: python-base (venv + pinned pip), wheels (the two local distributions),
# runtime-base (tini + the non-root user). Needs BuildKit (cache and bind mounts).
#
# The two distributions are built from this context: the server (pyproject.toml) and its
# client (./client), which is not on PyPI. Each role installs both wheels *by file path*
# (/wheels/local.txt lists them), so pip never resolves either name against PyPI (no
# dependency confusion); third-party dependencies come from PyPI within pyproject's ranges.

# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS python-base
# PIP_CACHE_DIR is where the BuildKit cache mounts below are, whatever XDG_CACHE_HOME says
# (runtime-base points that at the service's cache folder, which must not fill up with wheels).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CACHE_DIR=/root/.cache/pip \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A venv, as in development (the bundled tritonserver's Python stub finds its packages through
# the venv's pyvenv.cfg, DESIGN.md 6). pip is pinned: older pips cannot combine a wheel given by
# path with a named requirement carrying extras (`-r local.txt 'pkg[extra]'`).
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir pip==26.3

# ---------------------------------------------------------------------------------------------
FROM python-base AS wheels
WORKDIR /src
# .dockerignore keeps the venv, git, caches and tests out of this copy.
COPY . /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels ./client . \
 && printf '%s\n' /wheels/textnorm_reward_client-*.whl /wheels/textnorm_reward_service-*.whl \
      > /wheels/local.txt \
 && test -f "$(head -n 1 /wheels/local.txt)" \
 && test -f "$(tail -n 1 /wheels/local.txt)"

# ---------------------------------------------------------------------------------------------
FROM python-base AS runtime-base
# tini as PID 1: forwards SIGTERM to the service and reaps the children it spawns (the bundled
# tritonserver, Python backend stubs). Pinned to bookworm's only version (0.19.0-1+b3).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*
# Numeric, non-root user (Kubernetes' runAsNonRoot can only verify a numeric USER). Caches
# (the bundled Triton's runtime folder) go to XDG_CACHE_HOME: mount an emptyDir there when the
# root filesystem is read-only.
ENV XDG_CACHE_HOME=/var/cache/reward-service
RUN groupadd --system --gid 10001 reward \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/reward --create-home \
      --shell /usr/sbin/nologin reward \
 && install -d -o 10001 -g 10001 /var/cache/reward-service /models
WORKDIR /home/reward

# ---------------------------------------------------------------------------------------------
# export: torch (CPU) + the exporter. Builds model repositories; this stage also builds the two
# shipped ones that the other images copy.
FROM runtime-base AS export
# torch is pinned by the export extra (torch==2.13.0). It comes from PyTorch's CPU wheel index,
# installed first and on its own: PyPI's Linux torch wheels pull gigabytes of CUDA libraries,
# and exporting (torch → ONNX) runs on the CPU. The GPU image below keeps this CPU torch too:
# TensorRT brings its own CUDA runtime, the node's driver supplies libcuda, and nothing there
# runs torch on the GPU. The second install then finds torch==2.13.0 (2.13.0+cpu) satisfied.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -r /wheels/local.txt "textnorm-reward-service[export]" \
 && python -c "import torch, sys; sys.exit(f'torch must be a CPU build, got CUDA {torch.version.cuda}' if torch.version.cuda else 0)"
USER 10001:10001
# The shipped model (+ its learned head): the CPU flavour, checked against PyTorch (exit 1 past
# tolerance), and the GPU flavour, ONNX + configs only (engines are built on the GPU node by
# `reward-service build-engines`, for that GPU and TensorRT version). Also the two-model
# ensemble (CPU flavour): the shipped model + the shipped second member, shapes-clip-b.
RUN reward-service export --out /models/shapes-clip \
 && reward-service verify /models/shapes-clip \
 && reward-service export --out /models/shapes-clip-gpu --target gpu --precision fp16 \
 && reward-service export --out /models/shapes-clip-ensemble --member shapes-clip-b \
 && reward-service verify /models/shapes-clip-ensemble
ENTRYPOINT ["tini", "--", "reward-service"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# export-gpu: the export image + the gpu extra (TensorRT 10.5 = the NGC 24.10 Triton's, ONNX
# Runtime GPU 1.19.2), for `reward-service build-engines` (e.g. an init container on the GPU
# node) and deploy/gpu-check.sh. Run with the GPU exposed (`docker run --gpus all ...`).
FROM export AS export-gpu
USER 0:0
# TensorRT's PyPI packages are placeholders that fetch the real wheels from NVIDIA's index:
# naming that index (an extra index, for this install only) and listing the libs/bindings
# wheels makes pip take them directly. onnxruntime (export extra) and onnxruntime-gpu (gpu
# extra) both install the `onnxruntime` package and overwrite each other: keep only the GPU
# build (its CPU provider serves everything the CPU build did).
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com pip install -r /wheels/local.txt \
      "textnorm-reward-service[export,gpu]" \
      tensorrt-cu12-libs==10.5.0 tensorrt-cu12-bindings==10.5.0 \
 && pip uninstall -y onnxruntime onnxruntime-gpu \
 && pip install --no-deps onnxruntime-gpu==1.19.2 \
 && python -c "from importlib.metadata import version as v; import onnxruntime; print('tensorrt', v('tensorrt'), v('tensorrt-cu12-libs'), 'onnxruntime-gpu', v('onnxruntime-gpu'))"
COPY deploy/ /opt/reward-service/deploy/
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# gateway: the REST API (FastAPI + tritonclient gRPC), torch-free, against a Triton it did not
# start: `docker run -e REWARD_TRITON_URL=triton:8001 -e REWARD_API_KEYS='["..."]' ...`.
# It binds 0.0.0.0 here, so it refuses to start without an API key (by design).
FROM runtime-base AS gateway
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -r /wheels/local.txt "textnorm-reward-service[gateway]" \
 && if python -c "import torch" 2>/dev/null; then \
      echo "error: torch is importable in the gateway image" >&2; exit 1; \
    fi \
 && python -c "import service.gateway, tritonclient.grpc.aio" \
 && reward-service gateway --help > /dev/null
# The gateway needs only these two files of a repository; REWARD_REPOSITORY picks the export
# that the Triton it talks to serves (CPU flavour by default, or /models/shapes-clip-gpu).
COPY --from=export --chown=0:0 /models/shapes-clip/provenance.json /models/shapes-clip/tokenizer.json /models/shapes-clip/
COPY --from=export --chown=0:0 /models/shapes-clip-gpu/provenance.json /models/shapes-clip-gpu/tokenizer.json /models/shapes-clip-gpu/
COPY --from=export --chown=0:0 /models/shapes-clip-ensemble/provenance.json /models/shapes-clip-ensemble/tokenizer.json /models/shapes-clip-ensemble/
ENV REWARD_HOST=0.0.0.0 \
    REWARD_PORT=8000 \
    REWARD_REPOSITORY=/models/shapes-clip
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARD_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--", "reward-service"]
CMD ["gateway"]

# ---------------------------------------------------------------------------------------------
# triton: NVIDIA's Triton 24.10 (Triton 2.51, like the pip-bundled server; TensorRT 10.5; ONNX
# Runtime 1.19.2) with both shipped repositories. By default it serves the CPU flavour on its
# native onnxruntime backend (KIND_CPU), which runs on CPU-only nodes too. The GPU flavour needs
# its engines first: build them on the node (export-gpu image, `build-engines`) into a writable
# copy of /models/shapes-clip-gpu and pass that copy as --model-repository.
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS triton
# bf16 towers (`export --precision bf16`) run in the Python backend with OpenVINO (the native
# openvino backend fixes every batch at max_batch_size); fp32 and int8 need nothing more.
RUN pip install --no-cache-dir "openvino>=2025.4,<2027"
COPY --from=export --chown=0:0 /models/ /models/
# The liveness probe (standard library only, the image's python3): Triton stays "live" and
# "ready" when a Python-backend stub dies, this probe does not (deploy/triton_liveness.py).
COPY --chown=0:0 deploy/triton_liveness.py /opt/reward-service/triton_liveness.py
# The base image's non-root user: triton-server, uid/gid 1000.
USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "/opt/reward-service/triton_liveness.py", "--health=ready", "--timeout=4"]
# The base image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh, exec form) execs this command,
# so tritonserver gets SIGTERM and shuts down gracefully.
CMD ["tritonserver", "--model-repository=/models/shapes-clip", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--strict-readiness=true", "--exit-on-error=true"]

# ---------------------------------------------------------------------------------------------
# all-in-one: what `make serve` runs, in one container: the bundled CPU tritonserver on loopback
# and the gateway on 0.0.0.0:8000, serving the pre-exported repository as is (the exporter never
# runs, so torch is not installed). Needs REWARD_API_KEYS, like the gateway.
FROM runtime-base AS all-in-one
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -r /wheels/local.txt "textnorm-reward-service[gateway,triton]" \
 && if python -c "import torch" 2>/dev/null; then \
      echo "error: torch is importable in the all-in-one image" >&2; exit 1; \
    fi \
 && reward-service serve --help > /dev/null
COPY --from=export --chown=0:0 /models/shapes-clip/ /models/shapes-clip/
ENV REWARD_HOST=0.0.0.0 \
    REWARD_PORT=8000 \
    REWARD_REPOSITORY=/models/shapes-clip
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARD_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--", "reward-service"]
CMD ["serve", "--repository", "/models/shapes-clip"]
