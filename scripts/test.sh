#!/usr/bin/env bash
# The test command (README, .ci/run): set up the environment if needed, then run the whole suite.
. "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
