#!/usr/bin/env bash
# GPU acceptance check of the TensorRT path (DESIGN.md 4), on a node with an NVIDIA GPU:
#
#   1. export the shipped model and a ViT-B/32-sized random CLIP, GPU flavour, fp16;
#   2. reward-service build-engines for both (engine cache: $GPU_CHECK_WORK/engines);
#   3. fp16 parity: engine embeddings within 1e-2 and rewards within 5e-3 of the fp32 ONNX;
#   4. images/s of the ViT-B/32 image tower's engine at batch 1/8/32/64 vs the GPU's bound;
#   5. with `tritonserver` on PATH (NGC image): serve the ViT-B/32 GPU repository and measure
#      end-to-end images/s through Triton gRPC at concurrency 8 and 32.
#
# Runs in the export-gpu image (docker build --target export-gpu; docker run --gpus all ...
# /opt/reward-service/deploy/gpu-check.sh), or in a checkout: it uses $PYTHON, else python3
# when that has the project + TensorRT, else it makes a venv from the checkout
# ($GPU_CHECK_VENV, default $GPU_CHECK_WORK/venv; needs python3.11, PyPI, PyTorch's CPU index
# and pypi.nvidia.com; not counted in the 8-minute budget). Reruns reuse the exports and the
# engine cache.
#
# Exit status: 0 all good; 1 a parity check or a step failed; 2 no usable GPU or TensorRT
# (one line on stderr). Environment: PYTHON, GPU_CHECK_WORK, GPU_CHECK_VENV, NVIDIA_SMI.
set -euo pipefail

die() {
  echo "gpu-check: error: $*" >&2
  exit 2
}

# -- 0. a GPU, before anything else ------------------------------------------------------------
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
command -v "$NVIDIA_SMI" > /dev/null 2>&1 \
  || die "no NVIDIA GPU: '$NVIDIA_SMI' not found (run this on a GPU node, with the GPU exposed)"
GPUS=$("$NVIDIA_SMI" --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null) \
  || die "no usable NVIDIA GPU: '$NVIDIA_SMI' failed (driver not loaded, or no GPU exposed)"
GPU=${GPUS%%$'\n'*}
[[ -n $GPU ]] || die "no NVIDIA GPU: '$NVIDIA_SMI' lists none"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=${GPU_CHECK_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/textnorm-reward/gpu-check}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cd "$WORK" # never import the project from a checkout by accident: only from $PY's environment
BUDGET_S=480
T0=$SECONDS
TRITON_PID=""

step() {
  echo
  echo "== [$((SECONDS - T0))s] $*"
}
run() {
  echo "+ $*"
  "$@"
}
# The time taken, then what failed (exit 1) or that all passed (exit 0).
summary() {
  echo
  local took=$((SECONDS - T0))
  if ((took > BUDGET_S)); then
    echo "WARNING: took ${took}s, over the ${BUDGET_S}s budget"
  else
    echo "took ${took}s (budget ${BUDGET_S}s)"
  fi
  if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
  fi
  echo "gpu-check: all checks passed"
  exit 0
}
# A step the later ones need: when it fails, say so and stop with status 1 (its own status,
# say 2 for an export's one-line error, would read as "no usable GPU").
required() {
  local what=$1
  shift
  "$@" || {
    FAILED+=("$what")
    summary
  }
}
cleanup() {
  if [[ -n $TRITON_PID ]] && kill -0 "$TRITON_PID" 2> /dev/null; then
    kill -TERM "$TRITON_PID" 2> /dev/null || true
    wait "$TRITON_PID" 2> /dev/null || true
  fi
}
trap cleanup EXIT

# -- the Python environment: the project, its export + gpu extras ------------------------------
usable() { "$1" -c "import tensorrt, onnxruntime, torch, export.repository, shapes_world" 2> /dev/null; }

make_venv() {
  local venv=$1 log=$WORK/venv.log
  [[ -f $ROOT/pyproject.toml ]] || die "no usable Python (set PYTHON) and no checkout at $ROOT to install"
  command -v python3.11 > /dev/null 2>&1 || die "no usable Python (set PYTHON) and no python3.11 to make $venv"
  echo "making $venv (log: $log; not counted in the time budget)"
  {
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install pip==26.3
    # CPU torch (the exporter's torch==2.13.0 pin): nothing here runs torch on the GPU.
    "$venv/bin/pip" install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
    # TensorRT's PyPI packages fetch the real wheels from NVIDIA's index: name it.
    PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com "$venv/bin/pip" install -e "$ROOT/client" \
      -e "${ROOT}[export,gpu,gateway]" tensorrt-cu12-libs==10.5.0 tensorrt-cu12-bindings==10.5.0
    # onnxruntime and onnxruntime-gpu overwrite each other's package: keep the GPU build only.
    "$venv/bin/pip" uninstall -y onnxruntime onnxruntime-gpu
    "$venv/bin/pip" install --no-deps onnxruntime-gpu==1.19.2
  } > "$log" 2>&1 || die "could not install the project with TensorRT into $venv (see $log)"
}

if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif usable python3; then
  PY=$(command -v python3)
else
  VENV=${GPU_CHECK_VENV:-$WORK/venv}
  usable "$VENV/bin/python" || make_venv "$VENV"
  PY=$VENV/bin/python
fi
"$PY" -c "import tensorrt" 2> /dev/null || die "TensorRT is not importable by $PY (install the gpu extra)"
usable "$PY" || die "$PY lacks the project's export extra (torch, onnxruntime) or the project"
# shellcheck disable=SC2329 # called through `required`
rs() { run "$PY" -m service.cli "$@"; }
T0=$SECONDS # the budget starts once the environment is there

echo "gpu-check on $GPU; python $PY; TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)'); work $WORK"
SHIPPED=$WORK/shipped-gpu
VIT_CKPT=$WORK/vit-b32-random
VIT=$WORK/vit-b32-gpu
CACHE=$WORK/engines
FAILED=()

# -- 1. export -------------------------------------------------------------------------------
step "1/5 export: shipped model and a ViT-B/32-sized random CLIP, --target gpu --precision fp16"
if "$PY" -m service.cli build-vit-b32 --help > /dev/null 2>&1; then
  required "building the ViT-B/32 checkpoint" rs build-vit-b32 --out "$VIT_CKPT"
else
  required "building the ViT-B/32 checkpoint" run "$PY" -c "import sys; from pathlib import Path; \
from export.bench import vit_b32_checkpoint; \
from export.clip_model import load_clip; from service.settings import get_settings; \
print(vit_b32_checkpoint(Path(sys.argv[1]), load_clip(get_settings().model)))" "$VIT_CKPT"
fi
required "export of the shipped model" \
  rs export --out "$SHIPPED" --target gpu --precision fp16 --max-batch 64
required "export of the ViT-B/32 model" \
  rs export --out "$VIT" --model "$VIT_CKPT" --no-head --target gpu --precision fp16 --max-batch 64

# -- 2. engines --------------------------------------------------------------------------------
step "2/5 build-engines (cache $CACHE: GPU name + TensorRT version + ONNX hash)"
required "engines of the shipped model" rs build-engines "$SHIPPED" --cache "$CACHE"
required "engines of the ViT-B/32 model" rs build-engines "$VIT" --cache "$CACHE"

# -- 3. parity ---------------------------------------------------------------------------------
step "3/5 fp16 parity: embeddings within 1e-2, rewards within 5e-3 of the fp32 ONNX"
run "$PY" "$HERE/gpu_parity.py" parity "$SHIPPED" || FAILED+=("parity of the shipped model")
# A random-init CLIP scores all prompts of a set almost alike: TextNorm's min-max normalisation
# divides its fp16 error by that spread, so those outputs are reported, not gated, there.
run "$PY" "$HERE/gpu_parity.py" parity "$VIT" --report-only TEXTNORM \
  || FAILED+=("parity of the ViT-B/32 model")

# -- 4. TensorRT throughput --------------------------------------------------------------------
step "4/5 image tower (ViT-B/32, TensorRT fp16) images/s vs the GPU's bound"
run "$PY" "$HERE/gpu_parity.py" bench-tower "$VIT" --batches 1,8,32,64 \
  || FAILED+=("TensorRT benchmark")

# -- 5. through Triton -------------------------------------------------------------------------
step "5/5 end to end through Triton gRPC (image_encoder: ONNX Runtime preprocessing + engine)"
if ! command -v tritonserver > /dev/null 2>&1; then
  echo "skipped: no tritonserver on PATH (run inside the NGC tritonserver:24.10-py3 image for this step)"
elif ! "$PY" -c "import tritonclient.grpc.aio" 2> /dev/null; then
  echo "skipped: $PY has no tritonclient[grpc] (the gateway extra)"
else
  read -r HTTP GRPC METRICS < <("$PY" -c "import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))")
  echo "+ tritonserver --model-repository=$VIT (ports $HTTP/$GRPC/$METRICS; log $WORK/tritonserver.log)"
  tritonserver --model-repository="$VIT" --http-address=127.0.0.1 --grpc-address=127.0.0.1 \
    --metrics-address=127.0.0.1 --http-port="$HTTP" --grpc-port="$GRPC" \
    --metrics-port="$METRICS" > "$WORK/tritonserver.log" 2>&1 &
  TRITON_PID=$!
  ready=""
  for _ in $(seq 1 180); do
    kill -0 "$TRITON_PID" 2> /dev/null || break
    if "$PY" -c "import sys, urllib.request
sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)" \
      "http://127.0.0.1:$HTTP/v2/health/ready" 2> /dev/null; then
      ready=yes
      break
    fi
    sleep 1
  done
  if [[ -z $ready ]]; then
    echo "Triton did not become ready; the end of its log:"
    tail -n 20 "$WORK/tritonserver.log"
    FAILED+=("Triton serving")
  else
    SIZE=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['model']['image_size'])" "$VIT/provenance.json")
    run "$PY" "$HERE/gpu_parity.py" bench-triton --url "127.0.0.1:$GRPC" --image-size "$SIZE" \
      --concurrency 8,32 --seconds 3 || FAILED+=("Triton benchmark")
  fi
  cleanup
  TRITON_PID=""
fi

summary
