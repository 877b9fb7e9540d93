#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then with the embedded default model
# (emloc-tiny-vlm, assembled once from its installed packages) compile the bundled demos into a task
# memory, show what it holds, export the model to ONNX, and answer held-out images under ONNX Runtime.
. "$(dirname "$0")/env.sh"
emloc-edge compile demos -o task.emloc "$@"
emloc-edge inspect task.emloc
emloc-edge export
# One held-out image per bin; each line shows the image (its folder is the right bin) and the answer.
emloc-edge run --memory task.emloc $(for bin in examples/fashion-bins/test/*/; do ls "$bin"*.png | head -1; done)
