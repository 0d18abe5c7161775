#!/usr/bin/env bash
# The main job (`make demo`): start a local cluster (a controller and two node agents), make a
# demo model, deploy it as a function, invoke it cold and then warm, and show where it ran.
# The cluster stops when this script ends (or on Ctrl-C).
set -euo pipefail

BIN=${BIN:-.venv/bin}
export STOKE_HOME=${STOKE_HOME:-.stoke-home}
PORT=${PORT:-0}                      # 0: any free port; the CLI finds it in $STOKE_HOME
MODEL="$STOKE_HOME/models/demo-small"
LOG="$STOKE_HOME/cluster.log"
mkdir -p "$STOKE_HOME"
unset STOKE_URL STOKE_API_KEY        # use what `stoke up` saves under $STOKE_HOME

say() { printf '\n\033[1m$ stoke %s\033[0m\n' "$*"; "$BIN/stoke" "$@"; }

[ -d "$MODEL" ] || say demo-model "$MODEL" --size small

"$BIN/stoke" up --nodes 2 --port "$PORT" --home "$STOKE_HOME" >"$LOG" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; echo "cluster stopped (log: $LOG)"' EXIT
until grep -q "^stoke up: controller at" "$LOG"; do
  kill -0 "$UP" 2>/dev/null || { cat "$LOG"; echo "stoke up failed" >&2; exit 1; }
  sleep 0.2
done
grep -A4 "^stoke up: controller at" "$LOG"

say nodes
say deploy demo --model "$MODEL"
say invoke demo "Once upon a time" --max-tokens 24 --temperature 0              # cold start
say invoke demo "Once upon a time" --max-tokens 24 --temperature 0              # warm
say invoke demo "What is a serverless function?" --chat --stream --max-tokens 24 --seed 1
say status demo
say nodes
