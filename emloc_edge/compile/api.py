"""`compile_memory`: the Python API the `emloc-edge compile` command is a thin layer over."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence as Seq

from ..errors import BadInputError
from ..memory import TaskMemory
from ..models.base import ModelAdapter
from .compressor import CompileOptions, Compressor, Progress
from .demos import Demo, load_demos


def compile_memory(
    demos: str | Path | list[Demo],
    model: str | Path | ModelAdapter,
    *,
    output: str | Path | None = None,
    delta: float | None = None,
    ratios: Seq[float] | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    append: str | Path | None = None,
    question: str | None = None,
    progress: Progress | None = None,
) -> TaskMemory:
    """Compress demonstrations into an EMLoC task memory (and save it to `output` if given).

    demos: a demos folder (demos.jsonl or <answer>/<image> layout) or a list of `Demo`.
    model: a local HF model folder, a .gguf file, or an adapter from `load_model`.
    Options left as None take the paper's defaults, or with `append` the existing memory's own
    settings; `append` compresses the demos as further chunks of that memory file, whose earlier
    chunks stay bit-identical.
    """
    from ..models.loading import load_model

    # Cheap checks first: a bad demos folder or memory file should not wait for the model to load.
    if not isinstance(demos, list):
        demos = load_demos(Path(demos), question=question)
    existing = TaskMemory.load(append) if append is not None else None
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    if existing is not None:
        existing.check_model(adapter.fingerprint(), append)
    if not adapter.has_vision and any(d.image is not None for d in demos):
        raise BadInputError(f"{adapter.name} is a text-only model, but the demonstrations have images")
    base = _settings_of(existing) if existing is not None else CompileOptions()
    options = CompileOptions(
        delta=base.delta if delta is None else delta,
        ratios=base.ratios if ratios is None else tuple(ratios),
        chunk_size=base.chunk_size if chunk_size is None else chunk_size,
        precision=base.precision if precision is None else precision,
        policy=base.policy,
    )
    memory = Compressor(adapter, options).compile(demos, existing=existing, progress=progress)
    if output is not None:
        memory.save(output)
    return memory


def _settings_of(memory: TaskMemory) -> CompileOptions:
    h = memory.meta.hyperparameters
    return CompileOptions(
        delta=h["delta"], ratios=tuple(h["ratios"]), chunk_size=h["chunk_size"],
        precision=memory.meta.precision, policy=h.get("policy", "emloc"),
    )
