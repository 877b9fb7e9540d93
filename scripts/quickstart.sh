#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then with the embedded default model
# (emloc-tiny-vlm, assembled once from its installed packages) compile the bundled demos into a task
# memory, show what it holds, export the model to ONNX, and answer held-out images under ONNX Runtime.
# Each step is announced on stderr ("==> step") and ends with its time; the last line sums them.
started=$(date +%s.%N)
seconds() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() {  # step WHAT COMMAND...: announce, run, say how long it took
  local what=$1 t0; shift
  echo "==> $what" >&2
  t0=$(date +%s.%N)
  "$@"
  echo "==> $what: $(seconds "$t0") s" >&2
}
echo "==> set up the environment (.venv; once)" >&2
. "$(dirname "$0")/env.sh"
echo "==> set up the environment: $(seconds "$started") s" >&2
step "compile demos/ into task.emloc" emloc-edge compile demos -o task.emloc "$@"
step "inspect task.emloc" emloc-edge inspect task.emloc
step "export the embedded model (int8 weights; once per model)" emloc-edge export
# One held-out image per bin; each line shows the image (its folder is the right bin) and the answer.
step "answer one held-out image per bin" \
  emloc-edge run --memory task.emloc $(for bin in examples/fashion-bins/test/*/; do ls "$bin"*.png | head -1; done)
echo "==> quickstart done in $(seconds "$started") s" >&2
