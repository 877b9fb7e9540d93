#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, convert the offline SmolLM2 weights once,
# compile the bundled text task into a task memory, and show what it holds.
. "$(dirname "$0")/env.sh"
python scripts/setup_smollm2.py --out models/smollm2-135m-instruct
emloc-edge compile examples/warehouse-text --model models/smollm2-135m-instruct -o task.emloc "$@"
emloc-edge inspect task.emloc
