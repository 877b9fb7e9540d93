#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, convert the offline SmolLM2 weights once,
# compile the bundled text task into a task memory, and show what it holds.
. "$(dirname "$0")/env.sh"
python scripts/setup_smollm2.py --out models/smollm2-135m-instruct
emloc-edge compile examples/warehouse-text --model models/smollm2-135m-instruct -o task.emloc "$@"
emloc-edge inspect task.emloc
emloc-edge export --model models/smollm2-135m-instruct -o exported/smollm2-int8 --weights int8
emloc-edge run --memory task.emloc --model exported/smollm2-int8 \
    --prompt "Bin for strawberry?" --prompt "Bin for screwdriver?" --prompt "Bin for sweater?"
