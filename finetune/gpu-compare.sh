#!/usr/bin/env bash
# Raw vs TextNorm DDPO at GPU scale (issue 12), one command on a node with an NVIDIA GPU:
#
#   finetune/gpu-compare.sh OUT_DIR
#
# 0. With $GENERATOR_SIZE (64 or 128): a generator and a judge of that size, trained on the
#    device into OUT_DIR/generator-SIZE and OUT_DIR/judge-SIZE (kept: a rerun reuses them), used
#    by every later step in place of the shipped 32 px ones. The shipped CLIP reads counts from
#    64 px images but not from 32 px ones (README, "Why counting does not move").
# 1. A reward service: $REWARD_URL if set, else `reward-service gateway --onnx` on loopback over
#    the export in $REPO (default: the shipped model, exported into OUT_DIR/repo). --onnx runs
#    the export's ONNX files in the gateway process (the rewards Triton serves; see
#    tests/test_deployment.py), for nodes without tritonserver.
# 2. `reward-service finetune reward-signal` on the starting generator, for each TextNorm setting
#    in $SIGNAL_SETTINGS (OUT_DIR/reward_signal/): how well each reward orders its samples of a
#    prompt as the judge does, per attribute. Empty: skipped.
# 3. `reward-service finetune compare --device cuda --jobs N` over $REWARDS x $SEEDS, stopped
#    after $BUDGET_S seconds if $STEPS is not reached: then every run is reported at the last
#    step all of them checkpointed (STEPS_DONE in OUT_DIR/steps.txt), by the same command with
#    --steps STEPS_DONE (it resumes the runs, judges those checkpoints, writes the summary).
#    The starting generator and every run at half and all of the steps are judged on the
#    training prompts (prompt set 0) and on held-out prompts (prompt set 1).
#
# Environment (defaults): PYTHON (python3), DEVICE (cuda), REWARDS (raw,textnorm), SEEDS
# (0,1,2), STEPS (400), BUDGET_S (300), REPORT_BUDGET_S (240), CHECKPOINT_EVERY (10), PROMPTS
# (48), SAMPLE_BATCH (64), BATCHES (4), TRAIN_BATCH (64), JUDGE_PROMPTS (48), JUDGE_PER_PROMPT
# (16), REWARD_URL, REPO, EXPORT_ARGS (--no-calibration), TEXTNORM_RULE (the service's: auto),
# SIGNAL_SETTINGS (default,counting), SIGNAL_PER_PROMPT (16), GENERATOR_SIZE (32: the shipped
# generator and judge), GENERATOR_STEPS (800; set at 32 px, a 32 px generator is trained with
# that many steps and judged by the shipped judge), GENERATOR_IMAGES (12000), JUDGE_IMAGES (24000),
# JUDGE_EPOCHS (5). Run it from the repository root
# (or with the project installed).
set -euo pipefail
set -m # each background job its own process group: stopping one stops all its processes

OUT_DIR=${1:?usage: gpu-compare.sh OUT_DIR}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
REWARDS=${REWARDS:-raw,textnorm}
SEEDS=${SEEDS:-0,1,2}
STEPS=${STEPS:-400}
BUDGET_S=${BUDGET_S:-300}
EVERY=${CHECKPOINT_EVERY:-10}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
T0=$SECONDS
GATEWAY_PID=""
RUNS_PID=""

cleanup() {
  for pid in $RUNS_PID $GATEWAY_PID; do
    kill -TERM -- "-$pid" 2> /dev/null || true
  done
  wait 2> /dev/null || true
}
trap cleanup EXIT
say() { echo "== [$((SECONDS - T0))s] $*"; }
# `failed LOG MESSAGE`: the end of LOG, the message, exit 1
failed() {
  tail -n 40 "$1"
  echo "gpu-compare: $2"
  exit 1
}

# -- 0. a generator and judge of another size ---------------------------------------------------
MODELS=()
SIZE=${GENERATOR_SIZE:-32}
if [[ $SIZE != 32 || -n ${GENERATOR_STEPS:-} ]]; then
  TRAIN=(generator judge)
  [[ $SIZE == 32 ]] && TRAIN=(generator) # the shipped judge reads 32 px
  for what in "${TRAIN[@]}"; do
    dir=$OUT_DIR/$what-$SIZE
    if [[ $what == generator ]]; then
      args=(--steps "${GENERATOR_STEPS:-800}" --images "${GENERATOR_IMAGES:-12000}")
      written_last=generator.json
    else
      args=(--images "${JUDGE_IMAGES:-24000}" --epochs "${JUDGE_EPOCHS:-5}")
      written_last=judge_config.json
    fi
    if [[ -f $dir/$written_last ]]; then
      say "reusing the $SIZE px $what in $dir (delete it to train another)"
    else
      say "training a $SIZE px $what into $dir (log $OUT_DIR/train-$what.log)"
      # into a scratch folder first: a stopped training never leaves a folder to reuse
      rm -rf "$dir.partial" "$dir"
      "$PY" -m service.cli "train-$what" --size "$SIZE" --device "$DEVICE" --out "$dir.partial" \
        "${args[@]}" > "$OUT_DIR/train-$what.log" 2>&1 \
        || failed "$OUT_DIR/train-$what.log" "train-$what failed"
      mv "$dir.partial" "$dir"
      tail -n 1 "$OUT_DIR/train-$what.log"
    fi
    MODELS+=("--$what" "$dir")
  done
fi

# -- 1. the reward service -------------------------------------------------------------------
URL=${REWARD_URL:-}
if [[ -z $URL ]]; then
  REPO=${REPO:-$OUT_DIR/repo}
  if [[ ! -f $REPO/provenance.json ]]; then
    say "exporting the shipped model into $REPO"
    # the model's c, as the README's H200 runs had (EXPORT_ARGS= to serve the calibrated c)
    read -ra export_args <<< "${EXPORT_ARGS---no-calibration}"
    "$PY" -m service.cli export --out "$REPO" "${export_args[@]}"
  fi
  PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  URL=http://127.0.0.1:$PORT
  say "gateway --onnx on $URL (log $OUT_DIR/gateway.log)"
  "$PY" -m service.cli gateway --onnx --repository "$REPO" --port "$PORT" \
    > "$OUT_DIR/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  ready=""
  for _ in $(seq 1 120); do
    kill -0 "$GATEWAY_PID" 2> /dev/null || break
    if "$PY" -c "import sys, urllib.request
sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)" "$URL/readyz" \
      2> /dev/null; then
      ready=yes
      break
    fi
    sleep 0.5
  done
  if [[ -z $ready ]]; then
    echo "the gateway did not become ready; the end of its log:"
    tail -n 30 "$OUT_DIR/gateway.log"
    exit 1
  fi
fi

# -- 2. the reward signal on the starting generator -------------------------------------------
SIGNAL_SETTINGS=${SIGNAL_SETTINGS-default,counting}
if [[ -n $SIGNAL_SETTINGS ]]; then
  say "reward signal of the starting generator: $SIGNAL_SETTINGS"
  "$PY" -m service.cli finetune reward-signal --url "$URL" --device "$DEVICE" \
    --settings "$SIGNAL_SETTINGS" --prompts "${PROMPTS:-48}" ${MODELS[@]+"${MODELS[@]}"} \
    --per-prompt "${SIGNAL_PER_PROMPT:-16}" --out "$OUT_DIR/reward_signal" \
    > "$OUT_DIR/reward_signal.log" 2>&1 \
    || failed "$OUT_DIR/reward_signal.log" "reward-signal failed"
  cat "$OUT_DIR/reward_signal/reward_signal.md"
fi

# -- 3. the runs, bounded ----------------------------------------------------------------------
# every run at once: rewards x seeds
JOBS=$((($(tr -cd , <<< "$REWARDS" | wc -c) + 1) * ($(tr -cd , <<< "$SEEDS" | wc -c) + 1)))
compare() {
  "$PY" -m service.cli finetune compare --out "$OUT_DIR" --url "$URL" --device "$DEVICE" \
    --rewards "$REWARDS" --seeds "$SEEDS" --prompts "${PROMPTS:-48}" ${MODELS[@]+"${MODELS[@]}"} \
    --sample-batch-size "${SAMPLE_BATCH:-64}" --batches-per-step "${BATCHES:-4}" \
    --train-batch-size "${TRAIN_BATCH:-64}" --checkpoint-every "$EVERY" \
    --jobs "$JOBS" --judge-prompts "${JUDGE_PROMPTS:-48}" \
    --judge-per-prompt "${JUDGE_PER_PROMPT:-16}" --judge-prompt-seeds 0,1 \
    ${TEXTNORM_RULE:+--textnorm-rule "$TEXTNORM_RULE"} "$@"
}
# `bounded SECONDS ARGS...`: compare ARGS in the background (its own process group), stopped
# with all its processes after SECONDS; status 124 then, else compare's own.
bounded() {
  local budget=$1 deadline
  shift
  compare "$@" >> "$OUT_DIR/compare.log" 2>&1 &
  RUNS_PID=$!
  deadline=$((SECONDS + budget))
  while kill -0 "$RUNS_PID" 2> /dev/null && ((SECONDS < deadline)); do sleep 2; done
  if kill -0 "$RUNS_PID" 2> /dev/null; then
    kill -TERM -- "-$RUNS_PID" 2> /dev/null || true
    wait "$RUNS_PID" 2> /dev/null || true
    RUNS_PID=""
    return 124
  fi
  local status=0
  wait "$RUNS_PID" || status=$?
  RUNS_PID=""
  return "$status"
}

say "finetune compare: rewards $REWARDS, seeds $SEEDS ($JOBS runs in parallel), up to $STEPS steps or ${BUDGET_S}s"
status=0
bounded "$BUDGET_S" --steps "$STEPS" || status=$?
if ((status == 124)); then
  say "budget reached: stopped the runs"
  # The last step every run checkpointed.
  DONE=$("$PY" -c "import sys
from pathlib import Path
from finetune import run_dir as rd
from finetune.compare import run_name
runs = [Path(sys.argv[1]) / run_name(r, int(s)) for r in sys.argv[2].split(',') for s in sys.argv[3].split(',')]
print(min((rd.latest_checkpoint(r) or (0,))[0] for r in runs))" "$OUT_DIR" "$REWARDS" "$SEEDS")
  ((DONE >= 2)) || failed "$OUT_DIR/compare.log" "no step that every run checkpointed (a run did not reach step $EVERY)"
  say "reporting every run at step $DONE (at most ${REPORT_BUDGET_S:-240}s)"
  status=0
  bounded "${REPORT_BUDGET_S:-240}" --steps "$DONE" || status=$?
  ((status == 0)) || failed "$OUT_DIR/compare.log" "the report at step $DONE failed or ran out of time (status $status)"
elif ((status != 0)); then
  failed "$OUT_DIR/compare.log" "compare failed (status $status)"
else
  DONE=$STEPS
fi
echo "$DONE" > "$OUT_DIR/steps.txt"
say "done: $DONE steps per run"
cat "$OUT_DIR/summary.csv" "$OUT_DIR/fixed_set.md"
